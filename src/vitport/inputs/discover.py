"""Finding files: image files as given, directories expanded (by suffix, hidden entries
skipped), the inputs known unusable before reading, and reading them all into images and
problems."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from vitport.errors import ImageError
from vitport.format import count
from vitport.inputs.base import ImageProblem, LoadedImage
from vitport.inputs.decode import Unreadable, read_file

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
            loaded.append(LoadedImage(name=name, image=read_file(path)))
        except Unreadable as problem:
            problems.append(problem.problem(name))
    return loaded, problems
