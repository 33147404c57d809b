"""Decoding: a file or in-memory bytes to an upright RGB PIL image, whatever the file holds.

Everything a user hits in practice is handled here once: EXIF orientation, every PIL mode
(alpha composited onto white, CMYK, 16-bit and float data scaled by their real range),
multi-frame files, truncated and non-image files, and decompression bombs. A bad file raises
:class:`~vitport.errors.UnreadableImageError` with a one-line reason and its category.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitport.errors import UnreadableImageError, one_line
from vitport.inputs.base import ImageProblem


class Unreadable(Exception):
    """Internal: carries the one-line reason a file could not be read, and its category."""

    def __init__(self, reason: str, category: str) -> None:
        super().__init__(reason)
        self.reason, self.category = reason, category

    def problem(self, name: str) -> ImageProblem:
        return ImageProblem(name, self.reason, self.category)

    def error(self, name: str) -> UnreadableImageError:
        return UnreadableImageError(name, self.reason, self.category)


# --------------------------------------------------------------------------------------------
# Mode conversion
# --------------------------------------------------------------------------------------------

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Composite an image with alpha (or a transparency key) onto an opaque white background."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")


def _has_transparency(image: Image.Image) -> bool:
    """True if a P/L/RGB image carries a transparency key or a palette with alpha."""
    if "transparency" in image.info:
        return True
    return bool(getattr(image, "has_transparency_data", False))


def _gray_array_to_rgb(values: np.ndarray) -> Image.Image:
    """Turn a 2-D uint8 array into an RGB image."""
    return Image.fromarray(np.ascontiguousarray(values, dtype=np.uint8)).convert("RGB")


def _integer_to_rgb(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer image to 8 bits by its bit depth (not by clipping at 255)."""
    values = np.asarray(image)
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:  # I;16, I;16B, I;16L, I;16N
        return _gray_array_to_rgb(values >> 8)
    values = values.astype(np.int64)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low >= 0 and high <= 255:  # 8-bit data held in a wide mode
        return _gray_array_to_rgb(values)
    if low >= 0 and high <= 65535:  # 16-bit data (e.g. a 16-bit PGM or PNG opened as "I")
        return _gray_array_to_rgb(values >> 8)
    scaled = (values - low) * 255 // max(high - low, 1)  # anything else: stretch to 0..255
    return _gray_array_to_rgb(scaled)


def _float_to_rgb(image: Image.Image) -> Image.Image:
    """Map a float image to 8 bits: [0, 1] data is scaled by 255, anything else min-max."""
    values = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(values)
    values = np.where(finite, values, 0.0)
    if not finite.any():
        return _gray_array_to_rgb(np.zeros(values.shape, dtype=np.uint8))
    low, high = float(values[finite].min()), float(values[finite].max())
    if low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:  # constant image outside [0, 1]
        scaled = values
    return _gray_array_to_rgb(np.clip(np.rint(scaled), 0, 255))


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    """Convert CIE L*a*b* to sRGB colorimetrically (PIL's plain convert copies channels)."""
    try:
        from PIL import ImageCms
    except ImportError:  # Pillow built without littleCMS
        return image.convert("RGB")
    try:
        transform = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(image, transform)
    except (OSError, ValueError, ImageCms.PyCMSError):
        return image.convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Return a new, upright RGB copy of ``image``, whatever its mode.

    EXIF orientation is applied; a multi-frame image gives its first frame (the image is
    seeked to frame 0); alpha and palette transparency are composited onto white; CMYK,
    YCbCr, LAB and HSV are converted to RGB; 16-bit data is scaled by 1/256, 32-bit integer
    data by its range, float data from [0, 1] (or min-max when outside it).
    """
    if getattr(image, "n_frames", 1) > 1 and image.tell() != 0:
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and _has_transparency(image)):
        return _composite_on_white(image)
    if mode.startswith("I"):
        return _integer_to_rgb(image)
    if mode == "F":
        return _float_to_rgb(image)
    if mode == "LAB":
        return _lab_to_rgb(image)
    return image.convert("RGB")  # RGB (copies), L, 1, P, CMYK, YCbCr, HSV, RGBX, ...


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------

_BOMB_MESSAGE = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


def _bomb(error: BaseException) -> Unreadable:
    """A decompression bomb, with the pixel count and the limit when known."""
    found = _BOMB_MESSAGE.search(str(error))
    if not found:
        return Unreadable(f"decompression bomb: {one_line(error)}", "too-large")
    pixels, limit = found.groups()
    # PIL's error quotes twice the limit; warnings are errors here, so the limit is the value
    if Image.MAX_IMAGE_PIXELS:
        limit = str(Image.MAX_IMAGE_PIXELS)
    return Unreadable(
        f"decompression bomb: {pixels} pixels exceeds the {limit} limit "
        "(PIL.Image.MAX_IMAGE_PIXELS)",
        "too-large",
    )


def _undecodable(error: BaseException, action: str = "decode") -> Unreadable:
    """An error raised by PIL while opening or decoding an image: truncated or corrupt."""
    message = one_line(error)
    if "truncated" in message.lower() or "broken data stream" in message.lower():
        return Unreadable(f"truncated file ({message})", "truncated")
    return Unreadable(f"cannot {action} image, the file may be corrupt ({message})", "corrupt")


def _check_file(path: Path) -> None:
    """Raise Unreadable for inputs that are not a non-empty regular file."""
    try:
        if not path.exists():
            raise Unreadable("file not found", "missing")
        if path.is_dir():
            raise Unreadable("is a directory, not an image file", "unreadable")
        if not path.is_file():
            raise Unreadable("not a regular file", "unreadable")
        if path.stat().st_size == 0:
            raise Unreadable("empty file", "empty")
    except PermissionError as error:
        raise Unreadable("permission denied", "unreadable") from error
    except OSError as error:
        raise Unreadable(f"cannot access file ({one_line(error)})", "unreadable") from error


def read_file(path: Path) -> Image.Image:
    """Open, fully decode and convert one file; raise Unreadable with a one-line reason."""
    _check_file(path)
    return _decode(path)


def _decode(source: Path | io.BytesIO) -> Image.Image:
    """Open, fully decode and convert a file or in-memory bytes; Unreadable when unusable."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(source)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _bomb(error) from error
        except UnidentifiedImageError as error:
            raise Unreadable("not an image (cannot identify format)", "not-an-image") from error
        except FileNotFoundError as error:
            raise Unreadable("file not found", "missing") from error
        except PermissionError as error:
            raise Unreadable("permission denied", "unreadable") from error
        except IsADirectoryError as error:
            raise Unreadable("is a directory, not an image file", "unreadable") from error
        except Exception as error:  # any decoder failure is a reportable problem
            raise _undecodable(error, "open") from error
        with opened:
            try:
                opened.load()
                return to_rgb(opened)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
                raise _bomb(error) from error
            except MemoryError as error:
                raise Unreadable("out of memory while decoding", "too-large") from error
            except Exception as error:  # truncated or corrupt pixel data
                raise _undecodable(error) from error


def read_image(path: str | Path) -> Image.Image:
    """Read one image file as upright RGB; raise UnreadableImageError("<path>: <reason>"),
    with the problem's category, if unusable."""
    try:
        return read_file(Path(path))
    except Unreadable as problem:
        raise problem.error(str(path)) from problem.__cause__


def content_sha256(image: Image.Image) -> str:
    """A hash of an image's decoded pixels (after EXIF orientation and RGB conversion): the same
    picture gives the same hash from any file name or directory."""
    import hashlib

    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def read_image_bytes(data: bytes, name: str) -> Image.Image:
    """Decode an image held in memory (a Parquet column, say); UnreadableImageError
    ("<name>: <reason>", with the problem's category) if unusable."""
    try:
        if not data:
            raise Unreadable("empty file", "empty")
        return _decode(io.BytesIO(data))
    except Unreadable as problem:
        raise problem.error(name) from problem.__cause__
