"""One door for every model: `load(spec)` resolves a spec, loads it and returns an Encoder.

Where a spec's files come from is `vitport.families.sources` (demo:, hf:, atomgit:, ms:, timm:,
local directories); what each family is, is its record in the family registry
(`vitport.families.base`, one module per family).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vitport.errors import SpecError
from vitport.families.base import Family, family_of_timm_name, registry
from vitport.families.demo import DEMO_MODELS, demo_names
from vitport.families.sources import SOURCES, hub_snapshot, resolve
from vitport.port.manifest import Manifest, check_weights, is_port, read_manifest

if TYPE_CHECKING:  # torch and the model code load with the first model, not with the package
    import torch
    from torch import nn

    from vitport.device import Device
    from vitport.encoder import Encoder


def weights_sha256(module: nn.Module) -> str:
    """A hash of the weights as loaded (fp32, CPU), independent of file layout."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def load(
    spec: str,
    device: str | Device = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    fixes: Sequence[str] | None = None,
    image_size: int | None = None,
    weights: str | Path | None = None,
    trust_remote_code: bool = False,
) -> Encoder:
    """Load a model from any source into an Encoder on `device` in `dtype` with `fixes` applied.

    A port (a directory or hub repository with a vitport.json) runs at its own dtype and fixes
    where `dtype`/`fixes` are None, and one note says so; its weights (or, for a port made
    without them, its source's) must hash to the manifest's sha256, and `encoder.port` keeps
    the manifest. Otherwise None means fp32 and no fixes."""
    import torch

    from vitport.device import Device, parse_dtype, resolve_device
    from vitport.encoder import Encoder, find_blocks
    from vitport.families import hf
    from vitport.fixes import apply_fixes
    from vitport.port.settings import port_settings

    target = device if isinstance(device, Device) else resolve_device(device)
    start = time.perf_counter()
    kind, where, port, _ = _resolve(spec, weights is not None)
    if weights is not None and kind != "timm":
        raise SpecError(
            "weights=... is for timm:NAME specs; a directory carries its own weights",
            params=("weights=...",),
        )
    origin = spec
    if port is not None and not port.weights_included:  # made with --no-weights: its source
        origin = port.source
        kind, where = resolve(origin, weights_given=weights is not None)
    if kind == "timm":
        family = family_of_timm_name(str(where))
        if family is None or family.load is None:
            raise SpecError(f"no family loads the timm model '{where}'")
        loaded = family.load(str(where), Path(weights) if weights else None, image_size)
    else:
        loaded = hf.load_dir(Path(where), image_size, trust_remote_code)
    source = loaded.source
    if origin.startswith("demo:"):
        source = DEMO_MODELS[origin.removeprefix("demo:")].source
    sha256 = weights_sha256(loaded.module)
    if port is not None:
        check_weights(port, sha256, spec)
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
        weights_sha256=sha256,
        notes=list(loaded.notes),
        resampled_from=loaded.resampled_from,
        roles=loaded.roles,
        port=port,
    )
    settings = port_settings(port, dtype, fixes)
    encoder = encoder.to(target, parse_dtype(settings.dtype), copy=False)
    apply_fixes(encoder, settings.fixes)
    if settings.from_port:
        encoder.notes.append(settings.note)
    encoder.load_seconds = time.perf_counter() - start
    return encoder


def find_port(spec: str, weights_given: bool = False) -> tuple[Manifest, Path] | None:
    """The manifest of the port a spec names and the port's directory, before anything loads
    (a hub spec is downloaded as loading would); None for a spec that is no port (demo: and
    timm: specs never are)."""
    if spec.startswith(("demo:", "timm:")):
        return None
    _, _, port, home = _resolve(spec, weights_given)
    return (port, home) if port is not None and home is not None else None


def _resolve(
    spec: str, weights_given: bool
) -> tuple[str, Path | str, Manifest | None, Path | None]:
    """Where a spec's files are (as `resolve` says), the port manifest there if any, and the
    port's directory. A local port made without its weights (no config.json) is where it is."""
    if spec.startswith(("demo:", "timm:")):
        kind, where = resolve(spec, weights_given)
        return kind, where, None, None
    local = Path(spec).expanduser()
    if local.is_dir() and is_port(local) and not (local / "config.json").is_file():
        kind, where = "hf", local
    else:
        kind, where = resolve(spec, weights_given)
    home = local if local.is_dir() else Path(where) if kind == "hf" else None
    return kind, where, read_manifest(home) if home is not None else None, home


__all__ = [
    "SOURCES",
    "Family",
    "demo_names",
    "find_port",
    "hub_snapshot",
    "load",
    "registry",
    "resolve",
    "weights_sha256",
]
