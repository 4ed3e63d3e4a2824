"""
Overlap-tile semantic inference of images of any size (U-Net, Ronneberger et al., MICCAI 2015).

The image is cut into overlapping tiles (``TEST.TILING.TILE_SIZE``, ``STRIDE``), each with the
context around it (mirrored where it lies outside the image, as the U-Net paper does). The model
itself turns a batch of tiles (``BATCH_SIZE``) into logits: ``model.sem_seg_logits(tiles,
context)``, the method its own whole-image inference uses (normalisation, padding, backbone,
head, crop). The overlapping logits are blended (``BLEND``: a plain average, or a weight falling
off towards the tile edges) and stitched.

Tiling is the inference mode of seg2's meta-architectures (``TEST.TILING``, as MMSegmentation's
``test_cfg.mode="slide"``): :class:`seg2.modeling.meta_arch.Seg2SemanticSegmentor` (including
"valid"-padding U-Nets, which get the context their :meth:`tile_geometry` asks for) and the
semantic branch of :class:`seg2.modeling.meta_arch.Seg2MultiTaskRCNN` build one of these from
``TEST.TILING`` and use it in their own inference, so every caller (``Trainer.test``, TTA, the
predictor, the demo, the benchmarks) gets the same answer. detectron2's ``SemanticSegmentor``
and ``PanopticFPN`` do not tile; ``Seg2SemanticSegmentor`` / ``Seg2MultiTaskRCNN`` run the same
heads (``SemSegFPNHead`` included) and do.

Memory: with ``output="labels"`` the blended logits are kept only for the band of rows that
later tiles can still reach, so memory grows with the tile batch and the image width, not with
the image area (besides the (H, W) label map and the input itself).
"""

import dataclasses
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import configurable

from ..utils import InvalidArgument, config_keys

__all__ = [
    "BLEND_MODES",
    "TILING_KEYS",
    "TiledSemSegInference",
    "TilingSpec",
    "blend_window",
    "mirror_window",
    "reflect_indices",
    "tile_starts",
    "tiling_from_config",
]

BLEND_MODES = ("average", "linear", "gaussian")
# TilingSpec's arguments -> their config keys (TEST.TILING).
TILING_KEYS = {
    "tile_size": "TEST.TILING.TILE_SIZE",
    "stride": "TEST.TILING.STRIDE",
    "batch_size": "TEST.TILING.BATCH_SIZE",
    "blend": "TEST.TILING.BLEND",
    "margin": "TEST.TILING.MARGIN",
}


@dataclasses.dataclass(frozen=True)
class TilingSpec:
    """
    The geometry of overlap-tile inference, checked once, here (an :class:`InvalidArgument`
    naming the argument; :func:`tiling_from_config` names the ``TEST.TILING`` key instead).

    Attributes:
        tile_size (int): side of the output area of a tile, in pixels (>= 1).
        stride (int): step between tiles, ``1 <= stride <= tile_size`` (a larger one leaves gaps).
        batch_size (int): tiles per forward pass (>= 1); bounds the peak memory.
        blend (str): weights of overlapping logits, one of :data:`BLEND_MODES`.
        margin (int): context pixels fed around each tile (>= 0), see :class:`TiledSemSegInference`.
    """

    tile_size: int
    stride: int
    batch_size: int = 4
    blend: str = "gaussian"
    margin: int = 0

    def __post_init__(self):
        checks = (
            ("tile_size", self.tile_size >= 1, ">= 1"),
            (
                "stride",
                1 <= self.stride <= self.tile_size,
                f"in 1 .. tile size ({self.tile_size}); a larger stride leaves gaps",
            ),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("blend", self.blend in BLEND_MODES, f"one of {BLEND_MODES}"),
            ("margin", self.margin >= 0, ">= 0"),
        )
        for arg, ok, expected in checks:
            if not ok:
                raise InvalidArgument(arg, getattr(self, arg), expected)


def tiling_from_config(cfg) -> Dict:
    """``TEST.TILING`` as :class:`TilingSpec` arguments (checked; an error names the key), or an
    empty dict when ``TEST.TILING.ENABLED`` is False: the inference mode a meta-architecture is
    built with."""
    return _spec_of(cfg) if cfg.TEST.TILING.ENABLED else {}


def _spec_of(cfg) -> Dict:
    """The checked :class:`TilingSpec` arguments of ``TEST.TILING``."""
    t = cfg.TEST.TILING
    with config_keys(TILING_KEYS):
        spec = TilingSpec(
            tile_size=t.TILE_SIZE,
            stride=t.STRIDE,
            batch_size=t.BATCH_SIZE,
            blend=t.BLEND,
            margin=t.MARGIN,
        )
    return dataclasses.asdict(spec)


def reflect_indices(start: int, stop: int, size: int) -> torch.Tensor:
    """
    Indices into a side of ``size`` pixels for positions ``start .. stop-1``, reflected at the
    borders without repeating the edge pixel, as ``F.pad(mode="reflect")`` does, and repeated
    where the positions reach further than the side (a side of 1 pixel repeats it).
    """
    i = torch.arange(start, stop)
    if size == 1:
        return torch.zeros_like(i)
    period = 2 * (size - 1)
    i = i.remainder(period)
    return torch.where(i >= size, period - i, i)


def mirror_window(x: torch.Tensor, rows: Tuple[int, int], cols: Tuple[int, int]) -> torch.Tensor:
    """
    Rows ``rows[0] .. rows[1]-1`` and columns ``cols[0] .. cols[1]-1`` of the last two dims of
    ``x``, mirrored (:func:`reflect_indices`) where they lie outside it: U-Net's overlap-tile
    extrapolation of missing context. ``mirror_window(x, (-top, h + bottom), (-left, w + right))``
    mirror-pads ``x`` by any amount; a window inside ``x`` is a copy of that crop.
    """
    h, w = x.shape[-2:]
    x = x.index_select(-2, reflect_indices(rows[0], rows[1], h).to(x.device))
    return x.index_select(-1, reflect_indices(cols[0], cols[1], w).to(x.device))


def tile_starts(length: int, tile: int, stride: int, period: int = 1) -> List[int]:
    """
    Start offsets of tiles of side ``tile`` every ``stride`` pixels along a side of ``length``.
    One tile at 0 when the side is not longer than a tile. With ``period`` > 1 (the network's
    largest feature stride, at most ``tile``) the stride is rounded down to a multiple of it
    (at least one period), so every tile sees the pooling grid the whole image sees, and the
    last tile may reach past the border (into the mirror padding, cropped from its output).
    Otherwise the last tile ends at the border.
    """
    if length <= tile:
        return [0]
    if 1 < period <= tile:
        stride = max(period, stride - stride % period)
        n = -(-(length - tile) // stride)  # ceil
        return [k * stride for k in range(n + 1)]
    return list(range(0, length - tile, stride)) + [length - tile]


def blend_window(size: int, mode: str) -> torch.Tensor:
    """
    1-D blending weights of a tile side (float64, all > 0): "average" all ones, "linear" a tent
    falling to ``1/ceil(size/2)`` at the edges, "gaussian" a Gaussian of sigma ``size/8`` (as
    nnU-Net's), ``exp(-8)`` or more at the edges. A tile's 2-D weight is the outer product.
    """
    if mode not in BLEND_MODES:
        raise ValueError(f"blend mode {mode!r}: expected one of {BLEND_MODES}")
    idx = torch.arange(size, dtype=torch.float64)
    if mode == "average":
        return torch.ones(size, dtype=torch.float64)
    if mode == "linear":
        return torch.minimum(idx + 1, size - idx) / ((size + 1) // 2)
    sigma = size / 8.0
    return torch.exp(-0.5 * ((idx - (size - 1) / 2.0) / sigma) ** 2)


class _Stitcher:
    """
    Sums weighted tile logits and divides by the summed weights. With ``keep_logits=False`` only
    the ``band`` rows still open to later tiles are kept, in a ring buffer allocated once (image
    row ``r`` lives in buffer row ``r % band``); finished rows become class indices and their
    buffer rows are zeroed for the rows below.
    """

    def __init__(
        self, num_classes, height, width, norm_y, norm_x, keep_logits, band, device, dtype
    ):
        self.norm_y, self.norm_x = norm_y, norm_x
        self.keep_logits = keep_logits
        self.height = height
        self.band = height if keep_logits else band
        self.buf = torch.zeros(num_classes, self.band, width, device=device, dtype=dtype)
        if not keep_logits:
            self.labels = torch.empty(
                height,
                width,
                dtype=torch.uint8 if num_classes <= 256 else torch.int64,
                device=device,
            )
        self.base = 0  # first image row not finished yet

    def _segments(self, y0: int, y1: int):
        """(buffer row, image row, rows) pieces of image rows ``y0 .. y1-1`` in the ring."""
        out, y = [], y0
        while y < y1:
            r = y % self.band
            n = min(y1 - y, self.band - r)
            out.append((r, y, n))
            y += n
        return out

    def add(self, logits: torch.Tensor, weight: torch.Tensor, y0: int, x0: int):
        """Adds ``logits * weight`` ((K, th, tw) and (th, tw)) at image position (y0, x0)."""
        # A tile reaching past the bottom/right border: keep the part inside the image.
        th, tw = (
            min(logits.shape[1], self.height - y0),
            min(logits.shape[2], self.buf.shape[2] - x0),
        )
        assert y0 >= self.base and y0 + th - self.base <= self.band, "tile outside the open band"
        for r, y, n in self._segments(y0, y0 + th):
            i = y - y0
            self.buf[:, r : r + n, x0 : x0 + tw].addcmul_(
                logits[:, i : i + n, :tw], weight[i : i + n, :tw]
            )

    def _normalise(self, part: torch.Tensor, y0: int, y1: int):
        part.div_(self.norm_y[y0:y1].view(1, -1, 1)).div_(self.norm_x.view(1, 1, -1))

    def finish_rows(self, upto: int):
        """Rows above ``upto`` get no more tiles."""
        if self.keep_logits or upto <= self.base:
            return
        for r, y, n in self._segments(self.base, upto):
            part = self.buf[:, r : r + n]
            self._normalise(part, y, y + n)
            # max(0).indices: argmax, first index on ties, several times faster than argmax(0) on
            # CPU
            self.labels[y : y + n] = part.max(0).indices.to(self.labels.dtype)
            part.zero_()
        self.base = upto

    def result(self) -> torch.Tensor:
        if self.keep_logits:
            self._normalise(self.buf, 0, self.height)
            return self.buf
        self.finish_rows(self.height)
        return self.labels


class TiledSemSegInference:
    """
    Overlap-tile semantic inference (U-Net, Ronneberger et al., MICCAI 2015) with batched tiles
    and blended, stitched logits, for the semantic branch of a seg2 or detectron2 model.

    When one tile covers the image (``TILE_SIZE`` at least the image side), the result equals
    the model's whole-image inference exactly; tiles are clamped to the image, so images smaller
    than a tile are one tile.
    """

    @configurable
    def __init__(
        self,
        model,
        *,
        tile_size: int,
        stride: int,
        batch_size: int = 4,
        blend: str = "gaussian",
        margin: int = 0,
    ):
        """
        Args:
            model (nn.Module): in eval mode, with ``sem_seg_logits(images, context)`` (seg2's
                meta-architectures) and a ``backbone``; optionally ``tile_geometry(side)`` (the
                context a "valid"-padding network needs).
            tile_size, stride, batch_size, blend, margin: the :class:`TilingSpec` (checked
                there). The stride is rounded down to a multiple of the backbone's largest
                feature stride where that is <= tile_size (see :func:`tile_starts`); ``margin``
                is the context, in pixels, fed around each tile and cropped from its output
                (mirrored outside the image); a "valid"-padding model gets at least the context
                its ``tile_geometry`` asks for.
        """
        spec = TilingSpec(tile_size, stride, batch_size, blend, margin)
        if not hasattr(model, "sem_seg_logits"):
            raise InvalidArgument(
                "model",
                type(model).__name__,
                "a model with sem_seg_logits(images, context): Seg2SemanticSegmentor or "
                "Seg2MultiTaskRCNN (which run any semantic head, detectron2's too)",
            )
        self.model = model
        self.sem_seg_logits = model.sem_seg_logits
        # Period of the network's pooling grid: its largest feature stride.
        self.period = max(
            (s.stride or 1 for s in model.backbone.output_shape().values()), default=1
        )
        self.tile_size, self.stride, self.batch_size, self.blend, self.margin = dataclasses.astuple(
            spec
        )

    @classmethod
    def from_config(cls, cfg, model):
        """The ``TEST.TILING`` geometry (whatever ``TEST.TILING.ENABLED`` says)."""
        return {"model": model, **_spec_of(cfg)}

    def tiles(self, height: int, width: int) -> Tuple[Tuple[int, int], List[Tuple[int, int]]]:
        """((tile_h, tile_w), [(y0, x0), ...] in row-major order) for an image of that size."""
        th, tw = min(self.tile_size, height), min(self.tile_size, width)
        ys = tile_starts(height, th, self.stride, self.period)
        xs = tile_starts(width, tw, self.stride, self.period)
        return (th, tw), [(y, x) for y in ys for x in xs]

    def context(self, side: int) -> Tuple[int, int]:
        """(before, after): pixels of context fed on either side of ``side`` output pixels: the
        margin, or more where the model's ``tile_geometry`` asks for more."""
        geometry = getattr(self.model, "tile_geometry", None)
        in_side, before = geometry(side) if geometry is not None else (side, 0)
        return max(before, self.margin), max(in_side - side - before, self.margin)

    def _weights(self, side: int, starts: Sequence[int], length: int, device):
        # One tile along a side: weight 1, so that a single tile is returned bit-exactly.
        w = (
            blend_window(side, self.blend)
            if len(starts) > 1
            else torch.ones(side, dtype=torch.float64)
        )
        norm = torch.zeros(length, dtype=torch.float64)
        for s in starts:
            norm[s : s + side] += w[: length - s]
        return w.float().to(device), norm.float().to(device)

    @staticmethod
    def _band_rows(tiles: List[Tuple[int, int]], batch_size: int, tile_h: int, height: int) -> int:
        """Rows the stitcher keeps open at most: from the first row of a batch's first tile to the
        last row its tiles reach (rows above a batch's first tile are finished before it)."""
        band = 1
        for i in range(0, len(tiles), batch_size):
            chunk = tiles[i : i + batch_size]
            band = max(band, min(height, chunk[-1][0] + tile_h) - chunk[0][0])
        return band

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, output: str = "logits") -> torch.Tensor:
        """
        Args:
            image (Tensor): (C, H, W), uint8 or float, as the model's "image" input (pixel
                values in ``INPUT.FORMAT``, not normalised), on any device.
            output (str): "logits": (K, H, W) float blended logits; "labels": (H, W) class
                indices (uint8 when K <= 256), the argmax of those logits, computed band by band.

        Returns:
            Tensor on the model's device.
        """
        if output not in ("logits", "labels"):
            raise ValueError(f"output={output!r}: expected 'logits' or 'labels'")
        if image.dim() != 3 or min(image.shape) < 1:
            raise ValueError(f"expected a (C, H, W) image, got shape {tuple(image.shape)}")
        _, height, width = image.shape
        device = torch.device(self.model.device)
        (th, tw), tiles = self.tiles(height, width)
        ys = sorted({y for y, _ in tiles})
        xs = sorted({x for _, x in tiles})
        (top, bottom), (left, right) = self.context(th), self.context(tw)
        wy, norm_y = self._weights(th, ys, height, device)
        wx, norm_x = self._weights(tw, xs, width, device)
        w2d = wy[:, None] * wx[None, :]
        cuda = device.type == "cuda"
        if cuda and image.device.type == "cpu":
            image = image.pin_memory()
        # The image goes to the model's device once (asynchronously from pinned memory on CUDA)
        # and is mirror-padded there once: every tile with its context is then a slice of it,
        # cut on the device (the same pixels mirror_window gives tile by tile).
        image = image.to(device, non_blocking=cuda)
        rows, cols = (-top, ys[-1] + th + bottom), (-left, xs[-1] + tw + right)
        if rows != (0, height) or cols != (0, width):
            image = mirror_window(image, rows, cols)
        ih, iw = top + th + bottom, left + tw + right
        chunks = [tiles[i : i + self.batch_size] for i in range(0, len(tiles), self.batch_size)]

        def cut(chunk):
            return torch.stack([image[:, y : y + ih, x : x + iw] for y, x in chunk])

        # CUDA: the next batch is cut on a side stream while the model runs on the current one.
        # On the CPU there is nothing to overlap: batches are cut one after another.
        side = torch.cuda.Stream(device) if cuda else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(device))
        stitcher = None
        nxt = cut(chunks[0])
        for k, chunk in enumerate(chunks):
            batch = nxt
            if side is not None:
                current = torch.cuda.current_stream(device)
                current.wait_stream(side)
                batch.record_stream(current)
            if k + 1 < len(chunks):
                if side is not None:
                    with torch.cuda.stream(side):
                        nxt = cut(chunks[k + 1])
                else:
                    nxt = None
            logits = self.sem_seg_logits(batch, (top, bottom, left, right))
            del batch
            if side is None and k + 1 < len(chunks):
                nxt = cut(chunks[k + 1])
            if stitcher is None:
                band = self._band_rows(tiles, self.batch_size, th, height)
                stitcher = _Stitcher(
                    logits.shape[1],
                    height,
                    width,
                    norm_y,
                    norm_x,
                    output == "logits",
                    band,
                    device,
                    logits.dtype,
                )
            for (y, x), tile_logits in zip(chunk, logits):
                stitcher.add(tile_logits, w2d, y, x)
            del logits
            stitcher.finish_rows(chunks[k + 1][0][0] if k + 1 < len(chunks) else height)
        return stitcher.result()
