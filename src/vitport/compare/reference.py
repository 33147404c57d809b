"""What a comparison is measured against: a golden file from another machine, or a device here."""

from __future__ import annotations

from pathlib import Path

import torch

from vitport.device import Device, resolve_device
from vitport.encoder import Encoder, Features
from vitport.errors import VitportError
from vitport.golden import GoldenBlocks, as_reference


def load_golden(path: str | Path) -> Features:
    """A golden features file (vitport infer --out), remembering where it was read."""
    return as_reference(Features.load(path), path)


def open_reference(reference: str, localize: bool = False) -> Features | Device:
    """A golden file when `reference` names one, else the device it names. Localising against a
    golden file needs its block states."""
    if Path(reference).is_file():
        golden = load_golden(reference)
        if localize and GoldenBlocks.open(reference) is None:
            raise VitportError(
                f"{reference} holds final outputs only; to localise against it, write it with "
                "vitport infer --out FILE --with-blocks (or localise with --reference cpu)"
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
