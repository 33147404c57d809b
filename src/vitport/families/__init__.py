"""One door for every model: `load(spec)` resolves a spec, loads it and returns an Encoder.

Where a spec's files come from is `vitport.families.sources` (demo:, hf:, atomgit:, ms:, timm:,
local directories); what each family is, is its record in the family registry
(`vitport.families.base`, one module per family).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from torch import nn

from vitport.device import Device, parse_dtype, resolve_device
from vitport.encoder import Encoder, find_blocks
from vitport.errors import SpecError
from vitport.families import hf
from vitport.families.base import Family, family_of_timm_name, registry
from vitport.families.demo import DEMO_MODELS, demo_names
from vitport.families.sources import SOURCES, hub_snapshot, resolve


def weights_sha256(module: nn.Module) -> str:
    """A hash of the weights as loaded (fp32, CPU), independent of file layout."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def load(
    spec: str,
    device: str | Device = "cpu",
    dtype: str | torch.dtype = "fp32",
    *,
    image_size: int | None = None,
    weights: str | Path | None = None,
    trust_remote_code: bool = False,
) -> Encoder:
    """Load a model from any source into an Encoder on `device` in `dtype`."""
    target = device if isinstance(device, Device) else resolve_device(device)
    dtype = parse_dtype(dtype)
    start = time.perf_counter()
    kind, where = resolve(spec, weights_given=weights is not None)
    if weights is not None and kind != "timm":
        raise SpecError(
            "weights=... is for timm:NAME specs; a directory carries its own weights",
            params=("weights=...",),
        )
    if kind == "timm":
        family = family_of_timm_name(str(where))
        if family is None or family.load is None:
            raise SpecError(f"no family loads the timm model '{where}'")
        loaded = family.load(str(where), Path(weights) if weights else None, image_size)
    else:
        loaded = hf.load_dir(Path(where), image_size, trust_remote_code)
    source = loaded.source
    if spec.startswith("demo:"):
        source = DEMO_MODELS[spec.removeprefix("demo:")].source
    encoder = Encoder(
        module=loaded.module,
        spec=spec,
        family=loaded.family,
        layout=loaded.layout,
        arch=loaded.arch,
        preprocess=loaded.preprocess,
        device=resolve_device("cpu"),
        dtype=torch.float32,
        forward_fn=loaded.forward,
        blocks=find_blocks(loaded.module, loaded.arch.depth, loaded.roles),
        final_norm=loaded.final_norm,
        source=source,
        weights_sha256=weights_sha256(loaded.module),
        notes=list(loaded.notes),
        resampled_from=loaded.resampled_from,
        roles=loaded.roles,
    )
    encoder = encoder.to(target, dtype, copy=False)
    encoder.load_seconds = time.perf_counter() - start
    return encoder


__all__ = [
    "SOURCES",
    "Family",
    "demo_names",
    "hub_snapshot",
    "load",
    "registry",
    "resolve",
    "weights_sha256",
]
