"""
The one image reader of seg2: training and evaluation (the dataset mapper), TTA, the predictor,
the demo, the benchmarks and export all read and convert images here, so a model is used on the
pixels it was trained on.

What a file becomes, an (H, W, 3) uint8 array in "BGR" or "RGB" order:

* 8-bit RGB, grey ("L"), grey + alpha, palette ("P"), RGBA (alpha dropped), CMYK, YCbCr: PIL's
  conversion to RGB;
* 16-bit grey (PIL modes "I;16*", or "I" with values in 0..65535) and 16-bit colour PNGs:
  ``uint16="scale"`` maps 0..65535 linearly onto 0..255; ``"minmax"`` stretches each image's
  own range (for sensors that use part of the range). Grey becomes 3 equal channels;
* 32-bit float ("F"): values in [0, 1] are scaled by 255; any other range is an error naming the
  file (there is no one right mapping);
* EXIF orientation is applied, as detectron2's ``read_image`` does. Label maps are read as
  stored (:mod:`seg2.data.label_map`): a label map must be drawn on the image as it is shown
  (EXIF applied). The mapper checks that image and label map have the same size (a 90-degree
  EXIF rotation of a non-square image without a matching label map is an error naming both) and
  warns, naming the file, about images with any other EXIF orientation that have a label map.

Files that cannot be decoded (missing, empty, truncated, not an image, over PIL's decompression
bomb limit) raise :class:`~seg2.utils.UnreadableFileError` naming the file: training skips and
counts them, evaluation and the tools stop with that one line.
"""

from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

from ..utils import Seg2Error, UnreadableFileError

__all__ = ["UINT16_MODES", "read_image", "read_image_with_orientation", "to_uint8_image"]

# How 16-bit pixels become 8-bit: "scale" maps 0..65535 linearly onto 0..255; "minmax" stretches
# each image's own range onto 0..255 (for images that use only part of the range, e.g. 12-bit
# sensors).
UINT16_MODES = ("scale", "minmax")
_EXIF_ORIENTATION = 0x0112
_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _to_uint8(arr: np.ndarray, uint16: str) -> np.ndarray:
    if uint16 == "minmax":
        lo, hi = int(arr.min()), int(arr.max())
        if hi == lo:
            return np.zeros(arr.shape, dtype=np.uint8)
        return np.floor((arr.astype(np.float64) - lo) * 255.0 / (hi - lo) + 0.5).astype(np.uint8)
    return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _float_to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if not (np.isfinite(arr).all() and lo >= 0.0 and hi <= 1.0):
        raise Seg2Error(
            f"{name}: floating-point image with values in [{lo:g}, {hi:g}]; seg2 reads float "
            "images with values "
            "in [0, 1] (scaled by 255): convert it to 8 or 16 bit, or to that range"
        )
    return np.floor(arr.astype(np.float64) * 255.0 + 0.5).astype(np.uint8)


def to_uint8_image(array: np.ndarray, name: str = "image", uint16: str = "scale") -> np.ndarray:
    """
    An (H, W, 3) uint8 copy or view of an image array, channel order kept: the conversion
    :func:`read_image` applies to a decoded file, for arrays given directly (the predictor).

    Args:
        array (ndarray): (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (alpha dropped); uint8, uint16
            (or a signed/wider integer type with values in 0..65535, as PIL reads 16-bit PNGs),
            or float with values in [0, 1].
        name (str): the file or variable named in errors.
        uint16 (str): "scale" or "minmax", see :data:`UINT16_MODES`.

    Raises:
        Seg2Error: another shape, dtype or value range.
    """
    if uint16 not in UINT16_MODES:
        raise ValueError(f"uint16={uint16!r}: expected one of {UINT16_MODES}")
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[:, :, :1] if array.shape[2] == 1 else array[:, :, :3]
    elif array.ndim != 2:
        raise Seg2Error(f"{name}: image of shape {array.shape}; expected (H, W) or (H, W, 1|3|4)")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise Seg2Error(f"{name}: empty image of shape {array.shape}")
    if array.dtype.kind == "f":
        array = _float_to_uint8(array, name)
    elif array.dtype != np.uint8:
        if array.dtype.kind not in "ui" or array.min(initial=0) < 0 or array.max(initial=0) > 65535:
            raise Seg2Error(
                f"{name}: pixel type {array.dtype} with values in [{array.min()}, {array.max()}]; "
                "expected "
                "8-bit or 16-bit unsigned integers, or floats in [0, 1]"
            )
        array = _to_uint8(array, uint16)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return array


def _is_16bit_colour(im) -> bool:
    """A 48/64-bit colour PNG, which PIL decodes to 8 bits by truncation."""
    return any(
        str(getattr(t, "args", "")).startswith(("RGB;16", "RGBA;16"))
        for t in getattr(im, "tile", None) or []
    )


def _read_16bit_colour(path: str, orientation: int, uint16: str) -> np.ndarray:
    """A 16-bit-per-channel colour PNG as RGB uint8, converted as 16-bit grey images are (PIL
    would truncate to the high byte; cv2 keeps the 16 bits)."""
    import cv2

    if orientation != 1:
        raise Seg2Error(
            f"{path}: 16-bit colour PNG with EXIF orientation {orientation}: rotate the file itself"
        )
    arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 3:
        raise UnreadableFileError(path, "image", "cv2 cannot decode this 16-bit colour PNG")
    return to_uint8_image(arr[:, :, 2::-1], path, uint16)  # BGR(A) -> RGB


def read_image_with_orientation(
    path: str, format: str = "BGR", uint16: str = "scale", max_pixels: Optional[int] = None
) -> Tuple[np.ndarray, int]:
    """:func:`read_image` and the file's EXIF orientation tag (1, the identity, when absent)."""
    if format not in ("BGR", "RGB"):
        raise ValueError(f"format={format!r}: expected 'BGR' or 'RGB'")
    saved = Image.MAX_IMAGE_PIXELS
    try:
        if max_pixels is not None:
            Image.MAX_IMAGE_PIXELS = max_pixels or None
        with Image.open(path) as im:
            im.load()  # truncated files fail here, not later
            orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
            deep = _is_16bit_colour(im)
            im = ImageOps.exif_transpose(im)
            if deep:
                arr = _read_16bit_colour(path, orientation, uint16)
            elif im.mode in _INT_MODES:
                arr = to_uint8_image(np.asarray(im), path, uint16)
            elif im.mode == "F":
                arr = to_uint8_image(np.asarray(im), path)
            else:
                arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError as e:
        raise UnreadableFileError(path, "image", "no such file") from e
    except Image.DecompressionBombError as e:
        raise UnreadableFileError(
            path, "image", f"{e}; raise the limit with max_pixels / --max-pixels"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableFileError(path, "image", str(e) or type(e).__name__) from e
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    return (np.ascontiguousarray(arr[:, :, ::-1]) if format == "BGR" else arr), orientation


def read_image(
    path: str, format: str = "BGR", uint16: str = "scale", max_pixels: Optional[int] = None
) -> np.ndarray:
    """
    Read an image file as an (H, W, 3) uint8 array in ``format`` ("BGR" or "RGB"), as described
    in the module docstring.

    Args:
        path (str): the image file.
        format (str): "BGR" (cv2's order, what :class:`~seg2.inference.Seg2Predictor` takes) or
            "RGB"; a config's ``INPUT.FORMAT``.
        uint16 (str): see :data:`UINT16_MODES`.
        max_pixels (int or None): largest accepted image; None keeps PIL's guard against
            decompression bombs (about 179M pixels), 0 turns it off.

    Raises:
        UnreadableFileError: missing, unreadable or truncated file, or over the pixel limit.
        Seg2Error: an unsupported pixel type or range.
    """
    return read_image_with_orientation(path, format, uint16, max_pixels)[0]
