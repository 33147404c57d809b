"""The noise floors a comparison is read against: fp32 vs fp64 on the CPU, and what the
candidate's dtype alone costs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitport.compare.metrics import GroupResult, compare_groups
from vitport.compare.sides import Inputs, Progress, features_of, input_batches, no_progress
from vitport.device import dtype_name, resolve_device
from vitport.encoder import Encoder, Features


@dataclass(frozen=True)
class Floors:
    """The floors of one comparison, per output group."""

    fp32: dict[str, GroupResult]  # fp32 vs fp64, always
    dtype: str  # the dtype whose own cost `floor` measures
    floor: dict[str, GroupResult]  # what x floor divides by

    @property
    def kind(self) -> str:
        return floor_kind(self.dtype)


def measure_floors(
    base: Encoder,
    inputs: Inputs,
    dtype: torch.dtype,
    *,
    fp32: Features | None = None,
    batch_size: int = 4,
    progress: Progress = no_progress,
) -> Floors:
    """The floors of a candidate in `dtype` on `inputs`; `base` is the model on the CPU in
    fp32, and `fp32` its Features on `inputs` where already run (else they are run here)."""
    progress("noise floor: fp32 vs fp64 on the CPU")
    if fp32 is None:
        fp32 = features_of(base, inputs, batch_size)
    exact = base.to(resolve_device("cpu"), torch.float64)
    fp64 = features_of(exact, inputs, batch_size)
    floor_fp32 = compare_groups(fp64.groups(), fp32.groups())
    floor_dtype = floor_dtype_of(dtype)
    if floor_dtype == "fp32":
        return Floors(floor_fp32, floor_dtype, floor_fp32)
    progress(f"noise floor: weights and input rounded to {floor_dtype}, in fp64")
    rounded = rounded_features(exact, inputs, dtype, batch_size)
    return Floors(floor_fp32, floor_dtype, compare_groups(fp64.groups(), rounded.groups()))


def floor_dtype_of(dtype: torch.dtype) -> str:
    """The dtype whose cost the floor measures: fp16/bf16 as they are, fp32 for fp32 and fp64."""
    name = dtype_name(dtype)
    return name if name in ("fp16", "bf16") else "fp32"


def floor_kind(floor_dtype: str) -> str:
    """What the floor of a candidate in `floor_dtype` is, in one phrase."""
    if floor_dtype == "fp32":
        return "the same metric between fp32 and fp64 on the CPU (the arithmetic noise of fp32)"
    return (
        f"the same metric between fp64 on the weights and input rounded to {floor_dtype} and "
        f"fp64 on the exact ones, on the CPU (the error that {floor_dtype} alone costs)"
    )


def rounded_features(
    exact: Encoder, inputs: Inputs, dtype: torch.dtype, batch_size: int
) -> Features:
    """`exact` (an fp64 encoder) run in fp64 on its weights and the fp32 input both rounded to
    `dtype` and back: the error of the dtype's representation alone, without its arithmetic."""
    rounded = exact.to(copy=True)
    with torch.no_grad():
        for tensor in [*rounded.module.parameters(), *rounded.module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype).to(tensor.dtype))
    parts = []
    for pixels, names in input_batches(exact, inputs, batch_size):
        feats = rounded.encode(pixels.to(dtype).to(torch.float64), names)
        parts.append(feats.to("cpu", torch.float32))  # as infer returns the fp64 run's
    return Features.concat(parts)
