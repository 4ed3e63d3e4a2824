"""Reading any image a user points the demo or the predictor at: grayscale, palette, RGBA,
16-bit; unreadable or truncated files give a :class:`Seg2Error` naming the file."""

import numpy as np
from PIL import Image, ImageOps

from ..utils import Seg2Error

__all__ = ["UINT16_MODES", "read_image", "to_uint8_image"]

# How 16-bit pixels become 8-bit: "scale" maps 0..65535 linearly onto 0..255 (what the model saw
# in training if its data were 8-bit versions of such images); "minmax" stretches each image's
# own range onto 0..255 (for images that use only part of the range, e.g. 12-bit sensors).
UINT16_MODES = ("scale", "minmax")


def _to_uint8(arr: np.ndarray, uint16: str) -> np.ndarray:
    if uint16 == "minmax":
        lo, hi = int(arr.min()), int(arr.max())
        if hi == lo:
            return np.zeros(arr.shape, dtype=np.uint8)
        return np.floor((arr.astype(np.float64) - lo) * 255.0 / (hi - lo) + 0.5).astype(np.uint8)
    return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def to_uint8_image(array: np.ndarray, name: str = "image", uint16: str = "scale") -> np.ndarray:
    """
    An (H, W, 3) uint8 copy or view of an image array, channel order kept.

    Args:
        array (ndarray): (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (alpha dropped), uint8 or
            uint16 (or int32 with values in 0..65535, as PIL reads 16-bit PNGs).
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
    if array.dtype != np.uint8:
        if array.dtype.kind not in "ui" or array.min(initial=0) < 0 or array.max(initial=0) > 65535:
            raise Seg2Error(
                f"{name}: pixel type {array.dtype} with values in [{array.min()}, {array.max()}]; expected "
                "8-bit or 16-bit unsigned integers"
            )
        array = _to_uint8(array, uint16)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return array


def read_image(path: str, format: str = "BGR", uint16: str = "scale", max_pixels: int = None) -> np.ndarray:
    """
    Read an image file as an (H, W, 3) uint8 array in ``format`` ("BGR" or "RGB"), EXIF rotation
    applied (as detectron2's ``read_image``). Grayscale and palette images become 3 channels,
    alpha is dropped, 16-bit images are converted as ``uint16`` says.

    Args:
        path (str): the image file.
        format (str): "BGR" (cv2's order, what :class:`Seg2Predictor` takes) or "RGB".
        uint16 (str): see :data:`UINT16_MODES`.
        max_pixels (int or None): largest accepted image; None keeps PIL's guard against
            decompression bombs (about 179M pixels), 0 turns it off.

    Raises:
        Seg2Error: missing, unreadable or truncated file, or an unsupported pixel type.
    """
    if format not in ("BGR", "RGB"):
        raise ValueError(f"format={format!r}: expected 'BGR' or 'RGB'")
    saved = Image.MAX_IMAGE_PIXELS
    try:
        if max_pixels is not None:
            Image.MAX_IMAGE_PIXELS = max_pixels or None
        with Image.open(path) as im:
            im.load()  # truncated files fail here, not later
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                arr = to_uint8_image(np.asarray(im), path, uint16)
            elif im.mode == "F":
                raise Seg2Error(f"{path}: 32-bit float image (PIL mode 'F'); convert it to 8 or 16 bit first")
            else:
                arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError as e:
        raise Seg2Error(f"{path}: no such file") from e
    except Image.DecompressionBombError as e:
        raise Seg2Error(f"{path}: {e} (raise the limit with max_pixels / --max-pixels)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise Seg2Error(f"{path}: cannot read the image ({type(e).__name__}: {e})") from e
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    return np.ascontiguousarray(arr[:, :, ::-1]) if format == "BGR" else arr
