"""What a comparison is measured against: a golden file or an msprobe dump from another machine,
or a device here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vitport.device import Device, resolve_device
from vitport.encoder import Encoder, Features
from vitport.errors import VitportError
from vitport.golden import GoldenBlocks, as_reference, check_golden, source_of
from vitport.inputs import LoadedImage, PixelInputs
from vitport.msprobe import Dump, DumpBlocks, bind, is_dump, is_dump_reference, open_dump


def load_golden(path: str | Path) -> Features:
    """A golden features file (vitport infer --out), remembering where it was read."""
    return as_reference(Features.load(path), path)


def open_reference(reference: str, localize: bool = False) -> Features | Dump | Device:
    """A golden file or an msprobe dump when `reference` names one, else the device it names.
    Localising against a golden file needs its block states."""
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
    if "/" in reference or reference.endswith(".safetensors"):
        raise VitportError(f"golden file {reference} not found; write one with vitport infer --out")
    return resolve_device(reference)


def reference_model(base: Encoder, device: Device, dtype: torch.dtype = torch.float32) -> Encoder:
    """The in-process reference: `base` itself where it already runs on that device in that
    dtype, else a copy moved there."""
    if device == base.device and dtype == base.dtype:
        return base
    return base.to(device, dtype)


def load_reference_file(path: str | Path) -> Features | Dump:
    """A golden file, or an msprobe dump when `path` is a folder."""
    return open_dump(path) if Path(path).is_dir() else load_golden(path)


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
