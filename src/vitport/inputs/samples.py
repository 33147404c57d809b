"""Built-in inputs: photographs shipped with scikit-image, seeded random noise, and the inputs
a golden file names, recreated."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from vitport.errors import ImageError
from vitport.inputs.base import ImageProblem, LoadedImage
from vitport.inputs.decode import to_rgb
from vitport.inputs.discover import read_images

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
