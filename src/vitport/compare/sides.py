"""Running, kept apart from judging: both sides of a comparison run on the same inputs into
Features (as Polygraphy's `Comparator.run`), each side described as data."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vitport.device import dtype_name
from vitport.encoder import Encoder, Features
from vitport.golden import source_of
from vitport.inputs import LoadedImage, PixelInputs
from vitport.msprobe import is_dump_reference
from vitport.runtimes.base import Setup

Inputs = Sequence[LoadedImage] | PixelInputs
"""What a comparison runs on: images, or the pixel batches of a dump."""

Progress = Callable[[str], None]


def no_progress(_: str) -> None:
    """A progress sink that says nothing."""


@dataclass(frozen=True)
class Side:
    """One side of a comparison, as data: where it ran, how (its Setup: runtime, dtype,
    attention, fixes), and the file it was read from, if any."""

    kind: str  # "run", "golden" or "msprobe"
    device: str
    setup: Setup = field(default_factory=Setup)
    path: str = ""
    description: dict[str, str] = field(default_factory=dict)

    @property
    def dtype(self) -> str:
        return self.setup.dtype

    @property
    def fixes(self) -> tuple[str, ...]:
        return self.setup.fixes

    @property
    def runtime(self) -> str:
        return self.setup.runtime

    def to_dict(self) -> dict[str, Any]:
        """The setup's fields beside the side's own, as compare's JSON has always held them
        (attention only where it is not the default)."""
        data = {
            "kind": self.kind,
            "device": self.device,
            "dtype": self.dtype,
            "fixes": list(self.fixes),
            "path": self.path,
            "description": dict(self.description),
            "runtime": self.runtime,
        }
        if self.setup.attention != "default":
            data["attention"] = self.setup.attention
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Side:
        setup = Setup(
            runtime=data.get("runtime", "torch"),
            dtype=data["dtype"],
            attention=data.get("attention", "default"),
            fixes=tuple(data.get("fixes", ())),
        )
        return cls(
            data["kind"], data["device"], setup, data.get("path", ""), data.get("description", {})
        )


def encoder_side(encoder: Encoder, fixes: Sequence[str] = ()) -> Side:
    """An encoder run in this process, as a side: its runtime and dtype, with `fixes`."""
    setup = Setup(runtime=encoder.runtime, dtype=dtype_name(encoder.dtype), fixes=tuple(fixes))
    return Side("run", str(encoder.device), setup, description=encoder.device.describe())


def file_side(reference: Features) -> Side:
    """A golden file or an msprobe dump from another machine, as a side: the dtype it was
    written in."""
    return Side(
        kind="msprobe" if is_dump_reference(reference) else "golden",
        device=str(reference.meta.get("device")),
        setup=Setup(dtype=str(reference.meta.get("dtype"))),
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
