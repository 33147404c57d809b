"""Run an Encoder over images and time each call on the device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vitport.encoder import Encoder, Features
from vitport.errors import ImageError
from vitport.images import ImageProblem, LoadedImage


@dataclass
class InferResult:
    features: Features
    batch_seconds: list[float]  # device time of each batch, in order; the first includes warm-up
    batch_sizes: list[int]
    problems: list[ImageProblem] = field(default_factory=list)
    original_sizes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def per_image_ms(self) -> list[float]:
        """Device time per image, each image credited with its batch's share."""
        return [
            1000 * s / n
            for s, n in zip(self.batch_seconds, self.batch_sizes, strict=True)
            for _ in range(n)
        ]

    @property
    def first_call_ms(self) -> float:
        return 1000 * self.batch_seconds[0]


def infer(
    encoder: Encoder,
    images: Sequence[LoadedImage],
    batch_size: int = 1,
    problems: Sequence[ImageProblem] = (),
) -> InferResult:
    """Encode images in batches; features come back on the CPU in fp32 (exact for fp16/bf16)."""
    parts, seconds, sizes = [], [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = encoder.preprocess([im.image for im in chunk])
        with encoder.device.timer() as timer:
            feats = encoder.encode(pixels, [im.name for im in chunk])
        parts.append(feats.to("cpu", torch.float32))
        seconds.append(timer.seconds)
        sizes.append(len(chunk))
    if not parts:
        raise ImageError("no images to encode")
    return InferResult(
        features=Features.concat(parts),
        batch_seconds=seconds,
        batch_sizes=sizes,
        problems=list(problems),
        original_sizes=[im.image.size for im in images],
    )
