"""One check, assembled alike for compare, report and serve: what the candidate is compared
with (a golden file, an msprobe dump, or a device in this process), the inputs that go with
it, and the limits it is judged by."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vitport.compare.sides import Inputs
from vitport.compare.verdict import Threshold, thresholds_for
from vitport.device import Device, resolve_device
from vitport.encoder import Encoder, Features
from vitport.errors import VitportError
from vitport.golden import GoldenBlocks, as_reference, check_golden, source_of
from vitport.inputs import (
    ImageProblem,
    LoadedImage,
    PixelInputs,
    default_inputs,
    images_by_name,
)
from vitport.msprobe import Dump, DumpBlocks, bind, is_dump, is_dump_reference, open_dump

Source = Features | Dump | Device
"""A reference as opened before the model loads: a golden file, an msprobe dump, or a device."""

DUMP_BRINGS_INPUTS = (
    "an msprobe dump brings its own inputs (the pixels its first module took); drop the images, "
    "or write a golden file of them with vitport infer --out"
)

__all__ = [
    "DUMP_BRINGS_INPUTS",
    "CheckPlan",
    "Source",
    "assemble_check",
    "bind_reference",
    "check_inputs",
    "golden_blocks",
    "load_golden",
    "open_source",
    "reference_inputs",
    "reference_model",
]


# --- opening a reference, and binding it to the model ------------------------------------------


def load_golden(path: str | Path) -> Features:
    """A golden features file (vitport infer --out), remembering where it was read."""
    return as_reference(Features.load(path), path)


def reference_model(base: Encoder, device: Device, dtype: torch.dtype = torch.float32) -> Encoder:
    """The in-process reference: `base` itself where it already runs on that device in that
    dtype, else a copy moved there."""
    if device == base.device and dtype == base.dtype:
        return base
    return base.to(device, dtype)


def bind_reference(source: Features | Dump, base: Encoder) -> Features:
    """The reference Features: a golden file as read, a dump bound to `base` (checked against
    it) and its outputs replayed through the base's head."""
    if isinstance(source, Dump):
        from vitport.msprobe import reference_features

        return reference_features(bind(source, base), base)
    return source


def reference_inputs(
    reference: Features, base: Encoder, images: Sequence[LoadedImage] | PixelInputs
) -> Sequence[LoadedImage] | PixelInputs:
    """What to run on against a file reference: a dump's own pixel batches, or the given
    images checked against the golden file and put in its order."""
    if is_dump_reference(reference):
        return (
            images
            if isinstance(images, PixelInputs)
            else open_dump(source_of(reference)).pixel_inputs()
        )
    if isinstance(images, PixelInputs):
        raise VitportError("pixel inputs come from an msprobe dump; a golden file needs images")
    return check_golden(reference, base, images)


def golden_blocks(reference: Features, candidate: Encoder) -> GoldenBlocks | DumpBlocks | None:
    """The block states of a file reference, bound to the candidate's hook points."""
    if is_dump_reference(reference):
        return bind(open_dump(source_of(reference)), candidate, check_weights=False)
    from vitport.golden import golden_blocks as file_blocks

    return file_blocks(reference, candidate)


# --- the check -----------------------------------------------------------------------------------


def open_source(reference: str | Path, localize: bool = False) -> Source:
    """A golden file or an msprobe dump where `reference` names one (a folder is a dump),
    else the device it names; refused in one line before the model loads. Localising against
    a golden file needs its block states."""
    if Path(reference).is_dir():
        if not is_dump(reference):
            raise VitportError(
                f"{reference} is a folder without an msprobe dump.json; give a golden file "
                "(vitport infer --out) or msprobe's dump_path"
            )
        return open_dump(reference)
    if Path(reference).is_file():
        golden = load_golden(reference)
        if localize and GoldenBlocks.open(reference) is None:
            raise VitportError(
                f"{reference} holds final outputs only; to localise against it, write it with "
                "vitport infer --out FILE --with-blocks (or localise with reference='cpu')",
                params=("reference='cpu'",),
            )
        return golden
    if isinstance(reference, Path) or "/" in reference or reference.endswith(".safetensors"):
        raise VitportError(f"golden file {reference} not found; write one with vitport infer --out")
    return resolve_device(reference, param="reference")


def check_inputs(
    source: Source | None, images: Sequence[LoadedImage] | None = None, size: int = 224
) -> tuple[Inputs, list[ImageProblem]]:
    """What a check runs on: a dump's own pixel batches; else the given images; else a golden
    file's own images, recreated by name (with those that cannot be read); else the default
    set (real photos and seeded random inputs of `size`)."""
    if isinstance(source, Dump):
        if images:
            raise VitportError(DUMP_BRINGS_INPUTS)
        return source.pixel_inputs(), []
    if images:
        return list(images), []
    if isinstance(source, Features):
        return images_by_name(source.names)
    return default_inputs(size), []


@dataclass(frozen=True, eq=False)
class CheckPlan:
    """What a comparison is judged on: the reference bound to the model (a file's Features, or
    the model that runs here), its inputs (a golden file's checked and in its order), the limits,
    and, for a file's block states, the model its culprit's parts are compared with."""

    reference: Encoder | Features
    inputs: Inputs
    thresholds: tuple[Threshold, ...]
    part_reference: Encoder | None = None

    @property
    def kind(self) -> str:
        """ "run" (a model here), "golden" or "msprobe"."""
        if isinstance(self.reference, Encoder):
            return "run"
        return "msprobe" if is_dump_reference(self.reference) else "golden"


def assemble_check(
    base: Encoder,
    source: Source,
    dtype: torch.dtype,
    *,
    inputs: Inputs | None = None,
    overrides: Sequence[Threshold] = (),
    reference_dtype: torch.dtype = torch.float32,
    part_reference: Device | None = None,
) -> CheckPlan:
    """The check of a candidate in `dtype` against `source`, for `base` (the model on the CPU
    in fp32). `inputs`: as :func:`check_inputs` gives them (chosen here where None, and then a
    golden file's image that cannot be read is refused); a golden file refuses other images,
    another model or other preprocessing. A device reference runs
    `base` there in `reference_dtype`; `part_reference` (a device, fp32) only serves a file's
    block states."""
    if inputs is None:
        inputs, problems = check_inputs(source, None, base.image_size[0])
        if problems:
            raise VitportError(
                f"{source_of(source)}: cannot read its image {problems[0].name}: "
                f"{problems[0].reason}"
            )
    thresholds = tuple(thresholds_for(dtype, overrides))
    if isinstance(source, Device):
        return CheckPlan(reference_model(base, source, reference_dtype), inputs, thresholds)
    features = bind_reference(source, base)
    parts = reference_model(base, part_reference) if part_reference is not None else None
    return CheckPlan(features, reference_inputs(features, base, inputs), thresholds, parts)
