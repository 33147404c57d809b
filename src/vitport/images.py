"""Images in, RGB PIL images out: read files and directories, report bad files, make test inputs.

Everything a user hits in practice is handled here once: EXIF orientation, every PIL mode
(alpha composited onto white, CMYK, 16-bit and float data scaled by their real range),
multi-frame files, truncated and non-image files, and decompression bombs. A bad file is
reported as an :class:`ImageProblem` with a one-line reason; it never aborts a batch.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitport.errors import ImageError, UnreadableImageError, one_line
from vitport.format import count

__all__ = [
    "IMAGE_SUFFIXES",
    "PROBLEM_CATEGORIES",
    "ImageProblem",
    "LoadedImage",
    "find_images",
    "random_images",
    "read_image",
    "read_images",
    "scan_images",
    "sample_images",
    "to_rgb",
]

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".apng",
        ".bmp",
        ".dib",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".pfm",
        ".tga",
        ".ico",
        ".jp2",
        ".j2k",
        ".jpx",
        ".pcx",
        ".sgi",
        ".rgb",
        ".dds",
        ".qoi",
    }
)
"""File suffixes (lower case, with the dot) that directory expansion keeps."""


@dataclass(frozen=True)
class LoadedImage:
    """An image ready for a model: ``image`` is RGB, upright and fully decoded."""

    name: str
    image: Image.Image


@dataclass(frozen=True)
class PixelInputs:
    """Inputs already preprocessed, as a dump holds them: pixel batches [B, 3, H, W], one per
    forward call, and a name for each row."""

    names: list[str]
    batches: list[Any]  # torch.Tensor, kept untyped so that reading images needs no torch

    def __len__(self) -> int:
        return len(self.names)


PROBLEM_CATEGORIES = (
    "missing",  # the file does not exist
    "empty",  # the file (or the bytes) hold nothing
    "not-an-image",  # not an image format, or a non-image file inside a directory
    "too-large",  # a decompression bomb, or out of memory while decoding
    "truncated",  # the pixel data stops early
    "corrupt",  # a decoder failed on the file
    "preprocess",  # decoded, but the model's preprocessing failed on it
    "unreadable",  # anything else: permissions, not a regular file, ...
)
"""The kinds of image problem, each set where the problem is found (never read from wording)."""


@dataclass(frozen=True)
class ImageProblem:
    """An input that could not be used, with one short human-readable reason and its kind
    (one of PROBLEM_CATEGORIES)."""

    name: str
    reason: str
    category: str = "unreadable"


class _Unreadable(Exception):
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


def _bomb(error: BaseException) -> _Unreadable:
    """A decompression bomb, with the pixel count and the limit when known."""
    found = _BOMB_MESSAGE.search(str(error))
    if not found:
        return _Unreadable(f"decompression bomb: {one_line(error)}", "too-large")
    pixels, limit = found.groups()
    # PIL's error quotes twice the limit; warnings are errors here, so the limit is the value
    if Image.MAX_IMAGE_PIXELS:
        limit = str(Image.MAX_IMAGE_PIXELS)
    return _Unreadable(
        f"decompression bomb: {pixels} pixels exceeds the {limit} limit "
        "(PIL.Image.MAX_IMAGE_PIXELS)",
        "too-large",
    )


def _undecodable(error: BaseException, action: str = "decode") -> _Unreadable:
    """An error raised by PIL while opening or decoding an image: truncated or corrupt."""
    message = one_line(error)
    if "truncated" in message.lower() or "broken data stream" in message.lower():
        return _Unreadable(f"truncated file ({message})", "truncated")
    return _Unreadable(f"cannot {action} image, the file may be corrupt ({message})", "corrupt")


def _check_file(path: Path) -> None:
    """Raise _Unreadable for inputs that are not a non-empty regular file."""
    try:
        if not path.exists():
            raise _Unreadable("file not found", "missing")
        if path.is_dir():
            raise _Unreadable("is a directory, not an image file", "unreadable")
        if not path.is_file():
            raise _Unreadable("not a regular file", "unreadable")
        if path.stat().st_size == 0:
            raise _Unreadable("empty file", "empty")
    except PermissionError as error:
        raise _Unreadable("permission denied", "unreadable") from error
    except OSError as error:
        raise _Unreadable(f"cannot access file ({one_line(error)})", "unreadable") from error


def _read(path: Path) -> Image.Image:
    """Open, fully decode and convert one file; raise _Unreadable with a one-line reason."""
    _check_file(path)
    return _decode(path)


def _decode(source: Path | io.BytesIO) -> Image.Image:
    """Open, fully decode and convert a file or in-memory bytes; _Unreadable when unusable."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(source)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _bomb(error) from error
        except UnidentifiedImageError as error:
            raise _Unreadable("not an image (cannot identify format)", "not-an-image") from error
        except FileNotFoundError as error:
            raise _Unreadable("file not found", "missing") from error
        except PermissionError as error:
            raise _Unreadable("permission denied", "unreadable") from error
        except IsADirectoryError as error:
            raise _Unreadable("is a directory, not an image file", "unreadable") from error
        except Exception as error:  # any decoder failure is a reportable problem
            raise _undecodable(error, "open") from error
        with opened:
            try:
                opened.load()
                return to_rgb(opened)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
                raise _bomb(error) from error
            except MemoryError as error:
                raise _Unreadable("out of memory while decoding", "too-large") from error
            except Exception as error:  # truncated or corrupt pixel data
                raise _undecodable(error) from error


def read_image(path: str | Path) -> Image.Image:
    """Read one image file as upright RGB; raise UnreadableImageError("<path>: <reason>"),
    with the problem's category, if unusable."""
    try:
        return _read(Path(path))
    except _Unreadable as problem:
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
            raise _Unreadable("empty file", "empty")
        return _decode(io.BytesIO(data))
    except _Unreadable as problem:
        raise problem.error(name) from problem.__cause__


def _as_list(inputs: Iterable[str | Path]) -> list[str | Path]:
    """Accept a single path as well as an iterable of paths."""
    if isinstance(inputs, (str, Path)):
        return [inputs]
    return list(inputs)


def directory_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """Image files under ``directory`` (recursive) and the other files there, each sorted by
    path parts; hidden entries are skipped."""
    images, others = [], []
    for candidate in directory.rglob("*"):
        relative = candidate.relative_to(directory).parts
        if any(part.startswith(".") for part in relative):  # .git, .DS_Store, ._photo.jpg
            continue
        if candidate.is_file():
            is_image = candidate.suffix.lower() in IMAGE_SUFFIXES
            (images if is_image else others).append(candidate)
    order = lambda p: p.relative_to(directory).parts  # noqa: E731
    return sorted(images, key=order), sorted(others, key=order)


def not_an_image(path: Path, name: str | None = None) -> ImageProblem:
    """Why a file inside a directory is skipped without being opened."""
    kind = f"a {path.suffix.lower()} file" if path.suffix else "a file without a suffix"
    reason = f"not an image ({kind} inside a directory; only image suffixes are read)"
    return ImageProblem(str(path) if name is None else name, reason, "not-an-image")


def _expand(inputs: Iterable[str | Path]) -> tuple[list[tuple[str, Path]], list[ImageProblem]]:
    """(name, path) pairs to read, and the non-image files inside directories: files keep the
    name as given; directories are expanded."""
    pairs: list[tuple[str, Path]] = []
    skipped: list[ImageProblem] = []
    for item in _as_list(inputs):
        path = Path(item)
        if path.is_dir():
            images, others = directory_files(path)
            pairs.extend((str(found), found) for found in images)
            skipped.extend(not_an_image(other) for other in others)
        else:
            pairs.append((str(item), path))
    return pairs, skipped


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, directories expanded recursively (sorted, filtered by IMAGE_SUFFIXES).

    A path that does not exist is kept so that :func:`read_images` can report it; use
    :func:`scan_images` to learn, before reading, what will be skipped.
    """
    return [path for _, path in _expand(inputs)[0]]


def suffix_list() -> str:
    """The image suffixes, for messages: ".apng, .bmp, ..."."""
    return ", ".join(sorted(IMAGE_SUFFIXES))


def _scan(inputs: Iterable[str | Path]) -> tuple[list[tuple[str, Path]], list[ImageProblem]]:
    """What to read, and what is known unusable without reading it (missing paths and
    non-image files inside directories); ImageError when nothing is left to read."""
    given = _as_list(inputs)
    expanded, skipped = _expand(given)
    pairs, missing = [], []
    for name, path in expanded:
        (pairs if path.exists() else missing).append((name, path))
    problems = [ImageProblem(name, "file not found", "missing") for name, _ in missing] + skipped
    if not pairs:
        raise nothing_to_read(given, problems)
    return pairs, problems


def scan_images(inputs: Iterable[str | Path]) -> tuple[list[Path], list[ImageProblem]]:
    """Before any work (and before a model loads): the files to read, with directories
    expanded (see :func:`find_images`), and the inputs already known to be unusable: paths
    that do not exist and non-image files inside directories, each with its reason.

    Raises ImageError, naming what was skipped and the suffixes looked for, when nothing is
    left to read.
    """
    pairs, problems = _scan(inputs)
    return [path for _, path in pairs], problems


def nothing_to_read(given: Sequence[str | Path], problems: Sequence[ImageProblem]) -> ImageError:
    """The one line for inputs that hold no image to read."""
    where = ", ".join(str(item) for item in given) or "(no inputs)"
    missing = [p.name for p in problems if p.category == "missing"]
    if problems and len(missing) == len(problems):
        return ImageError(f"file not found: {', '.join(missing)}; check the path")
    shown = ", ".join(p.name for p in problems[:3]) + (", ..." if len(problems) > 3 else "")
    skipped = f" ({count(len(problems), 'other file')} skipped: {shown})" if problems else ""
    return ImageError(
        f"no images found in {where}{skipped}; pass image files or directories holding files "
        f"ending in {suffix_list()}"
    )


def skipped_summary(problems: Sequence[ImageProblem]) -> str:
    """``"3 skipped (missing 1, not-an-image 2)"``, or "" when nothing was skipped."""
    if not problems:
        return ""
    categories = [p.category for p in problems]
    counts = ", ".join(f"{c} {categories.count(c)}" for c in sorted(set(categories)))
    return f"{len(problems)} skipped ({counts})"


def read_images(inputs: Iterable[str | Path]) -> tuple[list[LoadedImage], list[ImageProblem]]:
    """Read every image in ``inputs``; bad files become ImageProblems, never exceptions.

    Missing paths and non-image files inside directories are problems too (see
    :func:`scan_images`). Raises ImageError only when nothing is left to read.
    """
    pairs, problems = _scan(inputs)
    loaded: list[LoadedImage] = []
    for name, path in pairs:
        try:
            loaded.append(LoadedImage(name=name, image=_read(path)))
        except _Unreadable as problem:
            problems.append(problem.problem(name))
    return loaded, problems


# --------------------------------------------------------------------------------------------
# Built-in inputs
# --------------------------------------------------------------------------------------------

# Photographs that ship inside the scikit-image wheel (no download, no pooch), in the order
# sample_images() returns them. Colour photos first, then grayscale ones.
_SAMPLES: tuple[tuple[str, str], ...] = (
    ("astronaut", "astronaut"),
    ("chelsea", "chelsea"),
    ("coffee", "coffee"),
    ("rocket", "rocket"),
    ("camera", "camera"),
    ("hubble_deep_field", "hubble_deep_field"),
    ("immunohistochemistry", "immunohistochemistry"),
    ("motorcycle", "stereo_motorcycle"),
    ("retina", "retina"),
    ("moon", "moon"),
    ("coins", "coins"),
    ("clock", "clock"),
    ("brick", "brick"),
    ("grass", "grass"),
    ("gravel", "gravel"),
    ("page", "page"),
    ("text", "text"),
)


def _sample_array(loader: Callable[[], object]) -> np.ndarray:
    """Call a skimage.data loader; stereo_motorcycle returns (left, right, disparity)."""
    data = loader()
    if isinstance(data, tuple):
        data = data[0]
    return np.asarray(data)


def sample_images(count: int = 8) -> list[LoadedImage]:
    """The first ``count`` real photos shipped with scikit-image, as RGB, named "skimage:<name>".

    The order is fixed. Raises ImageError if fewer than ``count`` are available.
    """
    if count < 0:
        raise ImageError(f"sample image count must be >= 0, got {count}")
    if count == 0:
        return []
    try:
        import skimage.data
    except ImportError as error:
        raise ImageError(
            "sample images need scikit-image; install it with: pip install scikit-image"
        ) from error
    samples: list[LoadedImage] = []
    for name, function in _SAMPLES:
        loader = getattr(skimage.data, function, None)
        if loader is None:
            continue
        try:
            array = _sample_array(loader)
        except Exception:  # this skimage build lacks the file; use the next one
            continue
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            continue
        image = Image.fromarray(array)
        samples.append(LoadedImage(name=f"skimage:{name}", image=to_rgb(image)))
        if len(samples) == count:
            return samples
    raise ImageError(
        f"asked for {count} sample images but only {len(samples)} ship with this scikit-image; "
        f"pass a count of at most {len(samples)} or give image files"
    )


def random_images(count: int, size: int = 224, seed: int = 0) -> list[LoadedImage]:
    """``count`` uniform-noise RGB images of ``size`` x ``size``, named "random:<seed>:<i>:<size>".

    Image ``i`` depends only on (seed, i, size), so results are reproducible across machines
    and a larger ``count`` extends a smaller one.
    """
    if count < 0:
        raise ImageError(f"random image count must be >= 0, got {count}")
    if size < 1:
        raise ImageError(f"random image size must be >= 1, got {size}")
    if seed < 0:
        raise ImageError(f"random image seed must be >= 0, got {seed}")
    images = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        name = f"random:{seed}:{index}:{size}"
        images.append(LoadedImage(name=name, image=Image.fromarray(pixels)))
    return images


DEFAULT_PHOTOS = 8
DEFAULT_RANDOM = 2


def default_inputs(size: int = 224) -> list[LoadedImage]:
    """What commands use when given no images: real photos, then seeded random noise."""
    return sample_images(DEFAULT_PHOTOS) + random_images(DEFAULT_RANDOM, size=size)


def images_by_name(names: Sequence[str]) -> tuple[list[LoadedImage], list[ImageProblem]]:
    """Recreate the inputs a golden file names: samples and random images by name, files by path."""
    wanted = [n for n in names if n.startswith("skimage:")]
    samples = {im.name: im for im in sample_images(_sample_rank(wanted))}
    loaded: list[LoadedImage] = []
    problems: list[ImageProblem] = []
    for name in names:
        if name in samples:
            loaded.append(samples[name])
        elif re.fullmatch(r"random:\d+:\d+:\d+", name):
            seed, index, size = (int(part) for part in name.split(":")[1:])
            loaded.append(random_images(index + 1, size=size, seed=seed)[index])
        else:
            found, missing = read_images([name])
            loaded.extend(found)
            problems.extend(missing)
    return loaded, problems


def _sample_rank(names: Sequence[str]) -> int:
    """How many samples to load so that every named one is among them."""
    order = [f"skimage:{name}" for name, _ in _SAMPLES]
    ranks = [order.index(n) + 1 for n in names if n in order]
    return max(ranks, default=0)
