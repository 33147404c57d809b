"""Running, kept apart from judging: both sides of a comparison run on the same inputs into
Features (as Polygraphy's `Comparator.run`), each side described as data."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from vitport.device import dtype_name
from vitport.encoder import Encoder, Features
from vitport.golden import source_of
from vitport.inputs import LoadedImage, PixelInputs
from vitport.msprobe import is_dump_reference

Inputs = Sequence[LoadedImage] | PixelInputs
"""What a comparison runs on: images, or the pixel batches of a dump."""

Progress = Callable[[str], None]


def no_progress(_: str) -> None:
    """A progress sink that says nothing."""


@dataclass(frozen=True)
class Side:
    """One side of a comparison, as data."""

    kind: str  # "run", "golden" or "msprobe"
    device: str
    dtype: str
    fixes: tuple[str, ...] = ()
    path: str = ""
    description: dict[str, str] = field(default_factory=dict)
    runtime: str = "torch"


def encoder_side(encoder: Encoder, fixes: Sequence[str] = ()) -> Side:
    """An encoder run in this process, as a side."""
    return Side(
        "run",
        str(encoder.device),
        dtype_name(encoder.dtype),
        tuple(fixes),
        description=encoder.device.describe(),
        runtime=encoder.runtime,
    )


def file_side(reference: Features) -> Side:
    """A golden file or an msprobe dump from another machine, as a side."""
    return Side(
        kind="msprobe" if is_dump_reference(reference) else "golden",
        device=str(reference.meta.get("device")),
        dtype=str(reference.meta.get("dtype")),
        path=source_of(reference),
        description=reference.meta.get("device_description", {}),
    )


def describe_side(side: Side) -> str:
    text = f"{side.device} {side.dtype}"
    if side.runtime != "torch":
        text += f" on {side.runtime}"
    if side.fixes:
        text += f" + {', '.join(side.fixes)}"
    if side.kind == "golden":
        text += f" (golden file {side.path})"
    elif side.kind == "msprobe":
        text += f" (msprobe dump {side.path})"
    return text


def input_names(inputs: Inputs) -> list[str]:
    return list(inputs.names) if isinstance(inputs, PixelInputs) else [im.name for im in inputs]


def input_batches(
    encoder: Encoder, inputs: Inputs, batch_size: int
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(pixels, names) per forward: images preprocessed `batch_size` at a time, or a dump's own
    batches as they went in."""
    if isinstance(inputs, PixelInputs):
        start = 0
        for pixels in inputs.batches:
            yield pixels, inputs.names[start : start + len(pixels)]
            start += len(pixels)
        return
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        yield encoder.preprocess([im.image for im in chunk]), [im.name for im in chunk]


def features_of(encoder: Encoder, inputs: Inputs, batch_size: int) -> Features:
    parts = [
        encoder.encode(pixels, names).to("cpu", torch.float32)
        for pixels, names in input_batches(encoder, inputs, batch_size)
    ]
    return Features.concat(parts)


def pixel_batches(encoder: Encoder, inputs: Inputs, batch_size: int) -> Iterator[torch.Tensor]:
    for pixels, _ in input_batches(encoder, inputs, batch_size):
        yield pixels


@dataclass(frozen=True, eq=False)
class Run:
    """Both sides run on the same inputs: what the judging steps read."""

    reference: Side
    candidate: Side
    names: tuple[str, ...]
    reference_features: Features
    candidate_features: Features


def run_sides(
    candidate: Encoder,
    reference: Encoder | Features,
    inputs: Inputs,
    *,
    fixes: Sequence[str] = (),
    batch_size: int = 4,
    progress: Progress = no_progress,
) -> Run:
    """The reference's Features (run here, or as a file holds them) and the candidate's, on
    `inputs`. A file reference's inputs must already be its own (see compare.check)."""
    if isinstance(reference, Features):
        ref_side, ref_feats = file_side(reference), reference
    else:
        progress(f"reference on {reference.device} ({dtype_name(reference.dtype)})")
        ref_side = encoder_side(reference)
        ref_feats = features_of(reference, inputs, batch_size)
    progress(f"candidate on {candidate.device} ({dtype_name(candidate.dtype)})")
    out_feats = features_of(candidate, inputs, batch_size)
    return Run(
        ref_side, encoder_side(candidate, fixes), tuple(input_names(inputs)), ref_feats, out_feats
    )
