"""The records every input path shares: an image ready for a model, inputs already turned
into pixels, and an input that could not be used, with its kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image


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
