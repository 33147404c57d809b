"""Images in, RGB PIL images out, and on to pixel batches; split by job:

- `decode`: a file or bytes to an upright RGB image, whatever the file holds; a bad file
  becomes one line with its category;
- `discover`: files as given and directories expanded, the inputs known unusable before
  reading, and reading them all (a bad file never aborts a batch);
- `samples`: built-in photographs, seeded random images, the inputs a golden file names;
- `stream`: the one DataLoader path from inputs to pixel batches (imported on its own: it
  needs torch, the rest does not).
"""

from __future__ import annotations

from vitport.inputs.base import PROBLEM_CATEGORIES, ImageProblem, LoadedImage, PixelInputs
from vitport.inputs.decode import content_sha256, read_image, read_image_bytes, to_rgb
from vitport.inputs.discover import (
    IMAGE_SUFFIXES,
    directory_files,
    find_images,
    not_an_image,
    nothing_to_read,
    read_images,
    scan_images,
    skipped_summary,
    suffix_list,
)
from vitport.inputs.samples import (
    DEFAULT_PHOTOS,
    DEFAULT_RANDOM,
    default_inputs,
    images_by_name,
    random_images,
    sample_images,
)

__all__ = [
    "DEFAULT_PHOTOS",
    "DEFAULT_RANDOM",
    "IMAGE_SUFFIXES",
    "PROBLEM_CATEGORIES",
    "ImageProblem",
    "LoadedImage",
    "PixelInputs",
    "content_sha256",
    "default_inputs",
    "directory_files",
    "find_images",
    "images_by_name",
    "not_an_image",
    "nothing_to_read",
    "random_images",
    "read_image",
    "read_image_bytes",
    "read_images",
    "sample_images",
    "scan_images",
    "skipped_summary",
    "suffix_list",
    "to_rgb",
]
