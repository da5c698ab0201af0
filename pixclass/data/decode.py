"""The only place bytes become pixels.

Any common format (JPEG, PNG, BMP, GIF first frame, WebP, TIFF), any mode (L, LA, P, RGBA, CMYK,
16-bit) comes out as an 8-bit RGB or L (one channel) PIL image with EXIF orientation applied.
Transparent pixels are composited over white, so a logo on a transparent background looks the
same as it does in a viewer. Only raster image formats are opened (never PDF/EPS through Pillow)."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageDecodeError

ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")  # JPEG covers MPO files too
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
_max_pixels = DEFAULT_MAX_PIXELS


def set_max_pixels(limit: int | None) -> None:
    """Raise or lower the largest image accepted (width x height, checked from the header before
    any pixel is decoded); None restores the default. Pillow's own check follows it."""
    global _max_pixels
    _max_pixels = int(limit) if limit else DEFAULT_MAX_PIXELS
    Image.MAX_IMAGE_PIXELS = max(_max_pixels, DEFAULT_MAX_PIXELS)


def _too_large(pixels: str, limit: int) -> str:
    """The one message for an image over the limit, quoting the limit in force (--max-pixels)."""
    return f"image too large ({pixels} pixels, limit {limit:,}; raise it with --max-pixels)"


def _pixels_in_pillow_message(error: Exception) -> str:
    """Pillow refuses a decompression bomb before its size is readable; its message has the count."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return f"{int(found.group(1)):,}" if found else "too many"


def open_image(source, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode a path, bytes or file object; raises ImageDecodeError on any failure."""
    max_pixels = max_pixels or _max_pixels
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        # Pillow's own bomb check (a process-wide setting) must not refuse what this call allows:
        # the per-call check below is the limit
        Image.MAX_IMAGE_PIXELS = max_pixels
    name = source if isinstance(source, (str, Path)) else getattr(source, "name", "<bytes>")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on odd metadata; failures still raise
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source, formats=ALLOWED_FORMATS)
            if img.width * img.height > max_pixels:
                raise ImageDecodeError(name, _too_large(f"{img.width}x{img.height}", max_pixels), kind="too_large")
            img.seek(0)  # animated GIF/WebP: first frame
            img.load()
            return img
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(name, "file not found") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:  # over Pillow's limit too
        raise ImageDecodeError(name, _too_large(_pixels_in_pillow_message(e), max_pixels), kind="too_large") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(name, "not an image or unsupported format", kind="unsupported") from None
    except Exception as e:  # Pillow raises many kinds (OSError, SyntaxError, ValueError...)
        raise ImageDecodeError(name, str(e) or type(e).__name__) from None


def _to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit single-channel images are scaled (not clipped) into 0..255."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img


def _flatten_alpha(img: Image.Image) -> Image.Image:
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Apply EXIF orientation and convert to 8-bit RGB (channels=3) or L (channels=1)."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not cost the image
        pass
    img = _flatten_alpha(_to_8bit(img))
    target = "RGB" if channels == 3 else "L"
    return img if img.mode == target else img.convert(target)


def decode_image(source, channels: int = 3, max_pixels: int | None = None) -> Image.Image:
    """Bytes, path or file object -> 8-bit RGB/L PIL image; raises ImageDecodeError with the name."""
    img = open_image(source, max_pixels)
    try:
        return to_mode(img, channels)
    except Exception as e:
        raise ImageDecodeError(source if isinstance(source, (str, Path)) else "<bytes>", f"cannot convert: {e}") from None


def read_size(path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path, formats=ALLOWED_FORMATS) as img:
            return img.size
    except Exception as e:
        raise ImageDecodeError(path, str(e) or type(e).__name__) from None
