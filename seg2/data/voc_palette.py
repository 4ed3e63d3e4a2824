"""The Pascal VOC colour map, as the VOC devkit's ``VOClabelcolormap.m`` builds it."""


def _voc_palette(n=256):
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.extend((r, g, b))
    return palette


# Flat [r0, g0, b0, r1, ...] list of 256 colours, for PIL's Image.putpalette.
VOC_PALETTE = _voc_palette()


def palette_colors(num_colors: int, palette=None):
    """The first ``num_colors`` colours of a flat ``[r0, g0, b0, r1, ...]`` palette (VOC's by
    default) as ``(r, g, b)`` tuples: the form of detectron2's ``stuff_colors`` / ``thing_colors``."""
    palette = VOC_PALETTE if palette is None else list(palette)
    if 3 * num_colors > len(palette):
        raise ValueError(f"the palette has {len(palette) // 3} colours, {num_colors} asked for")
    return [tuple(int(v) for v in palette[3 * i : 3 * i + 3]) for i in range(num_colors)]
