"""Run an Encoder over images and time each call on the device."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vitport.encoder import Encoder, Features
from vitport.errors import ImageError
from vitport.inputs import ImageProblem, LoadedImage
from vitport.inputs.stream import Input


@dataclass
class InferResult:
    features: Features
    batch_seconds: list[float]  # device time of each batch, in order; the first includes warm-up
    batch_sizes: list[int]
    problems: list[ImageProblem] = field(default_factory=list)
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    content_sha256: list[str] = field(default_factory=list)  # of each encoded image, in order
    notes: list[str] = field(default_factory=list)  # e.g. DataLoader workers that could not start

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
    from vitport.inputs import content_sha256

    return InferResult(
        features=Features.concat(parts),
        batch_seconds=seconds,
        batch_sizes=sizes,
        problems=list(problems),
        original_sizes=[im.image.size for im in images],
        content_sha256=[content_sha256(im.image) for im in images],
    )


def infer_pixels(encoder: Encoder, pixels: torch.Tensor, names: Sequence[str]) -> InferResult:
    """Encode one batch that is already preprocessed (a dump's pixels), timed on the device."""
    with encoder.device.timer() as timer:
        feats = encoder.encode(pixels, names)
    return InferResult(feats.to("cpu", torch.float32), [timer.seconds], [len(pixels)])


def infer_inputs(
    encoder: Encoder,
    inputs: Sequence[Input],
    batch_size: int = 1,
    workers: int = 2,
    on_batch: Callable[[int, int], None] = lambda done, total: None,
    skipped: Sequence[ImageProblem] = (),
) -> InferResult:
    """Encode image files streamed through DataLoader workers: decoded images never pile up, so
    memory stays flat in the number of images. Unreadable ones become problems, after the
    `skipped` ones found before reading (see vitport.inputs.scan_images)."""
    from vitport.inputs import stream

    device = encoder.device
    pin = device.pin_memory
    dataset = stream.ImageInputs(inputs, encoder.preprocess, encoder.dtype, digests=True)
    pool = stream.Workers(workers)
    parts, seconds, sizes, originals, digests = [], [], [], [], []
    problems = list(skipped)
    done = 0
    for batch, _ in stream.stream(dataset, batch_size, pool, pin):
        problems.extend(ImageProblem(f.path, f.message, f.reason) for f in batch.failures)
        if batch.indices:
            pixels = batch.pixels.to(device.torch_device, non_blocking=pin)
            with device.timer() as timer:
                feats = encoder.encode(pixels, [inputs[i].id for i in batch.indices])
            parts.append(feats.to("cpu", torch.float32))
            seconds.append(timer.seconds)
            sizes.append(len(batch.indices))
            originals.extend(batch.sizes)
            digests.extend(batch.digests)
        done += len(batch.indices) + len(batch.failures)
        on_batch(done, len(inputs))
    if not parts:
        first_problem = f"; first: {problems[0].name}: {problems[0].reason}" if problems else ""
        raise ImageError(
            f"none of the given images could be read ({len(inputs)} given{first_problem})"
        )
    return InferResult(
        Features.concat(parts), seconds, sizes, problems, originals, digests, pool.notes
    )
