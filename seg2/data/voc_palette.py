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
