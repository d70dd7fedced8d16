"""Decoding images of every kind the CLI meets (paths, PIL, numpy; EXIF, 16-bit, palette, alpha)
into (H, W, 3) uint8 RGB, with one error type for files that are not images."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Union

import cv2
import numpy as np
from PIL import Image, ImageOps

ImageLike = Union[str, Path, np.ndarray, Image.Image]


class ImageReadError(ValueError):
    """An image that cannot be decoded (corrupt, truncated, empty, not an image)."""


def read_image(source: ImageLike) -> np.ndarray:
    """Any supported image -> (H, W, 3) uint8 RGB.

    Paths honour EXIF orientation; grayscale, 16-bit, palette and RGBA inputs are converted.
    numpy inputs are taken as RGB (or grayscale (H, W)); uint16 is scaled to 8 bits.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        return _decode(path, str(path), lambda: cv2.imread(str(path), cv2.IMREAD_UNCHANGED))
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    raise TypeError(f"unsupported image type {type(source).__name__}")


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Encoded image bytes (a download, an upload) -> (H, W, 3) uint8 RGB, as :func:`read_image`
    reads a file (EXIF orientation, the same conversions); ``name`` is for the error message."""
    return _decode(io.BytesIO(data), name, lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED))


def _decode(fp: Path | io.BytesIO, name: str, cv2_read: Callable[[], np.ndarray | None]) -> np.ndarray:
    try:
        with Image.open(fp) as im:
            im.load()  # force a full decode so truncated files fail here, not later
            im = ImageOps.exif_transpose(im)
            return _pil_to_rgb(im)
    except FileNotFoundError:
        raise ImageReadError(f"{name}: no such file") from None
    except Image.UnidentifiedImageError as e:
        # a format PIL lacks (some TIFFs/HDR) may still open in OpenCV; truncated or corrupt
        # files that PIL recognised are not retried, since OpenCV would return half an image
        arr = cv2_read()
        if arr is None or arr.size == 0:
            raise ImageReadError(f"{name}: cannot decode image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
        elif arr.ndim == 3:
            arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
        return _array_to_rgb(arr)
    except Exception as e:  # PIL raises many types for truncated/corrupt data
        raise ImageReadError(f"{name}: cannot decode image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_rgb(np.asarray(im))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # composite on white: transparent areas of labels/screenshots are background, not black
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return np.ascontiguousarray(np.asarray(im.convert("RGB")))


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        hi = 65535.0 if arr.dtype == np.uint16 or a.max() > 255 else (1.0 if a.max() <= 1.0 else 255.0)
        arr = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(f"unsupported image array of shape {arr.shape}")
    return np.ascontiguousarray(arr)
