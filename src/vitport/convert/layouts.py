"""Checkpoint layouts: recognise one by its keys, describe its architecture, build and write one.

Layouts: ``hf`` (transformers), ``timm``, and the families' own releases (their records'
``foreign`` layouts, such as DINOv2's torch-hub release). Those are read only; timm reads them
through its checkpoint filter, which makes it their reference function. What differs by family
(tables, configs, timm recipes) comes from the family registry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitport.encoder import Architecture, Encoder
from vitport.errors import SpecError, WeightsError
from vitport.families.base import (
    Conversion,
    ForeignLayout,
    Preprocessing,
    conversion,
    conversions,
    foreign_layouts,
    timm_aliases,
)

TARGETS = ("hf", "timm", "onnx")

# A key only that layout has, checked in order (as timm's checkpoint filter does); the families'
# own releases come first.
OWN_SENTINELS = (
    ("hf", "embeddings.patch_embeddings.projection.weight"),
    ("hf", "embeddings.patch_embed.weight"),
    ("timm", "patch_embed.proj.weight"),
)


def layout_names() -> tuple[str, ...]:
    """Every checkpoint layout: transformers', timm's, and the families' own releases."""
    return ("hf", "timm", *(layout.name for layout in foreign_layouts()))


def __getattr__(name: str) -> object:
    if name == "LAYOUTS":  # the registry decides, so it is computed on use
        return layout_names()
    raise AttributeError(name)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def detect_layout(keys: Iterable[str]) -> str:
    prefixes = ("", *(c.hf_prefix for c in conversions() if c.hf_prefix))
    found = {k.removeprefix(p) for k in keys for p in prefixes if k.startswith(p)}
    sentinels = [(f.name, f.sentinel) for f in foreign_layouts()] + list(OWN_SENTINELS)
    for layout, key in sentinels:
        if key in found:
            return layout
    sample = ", ".join(sorted(found)[:3])
    raise SpecError(
        f"cannot tell the checkpoint layout from its keys ({sample}, ...); "
        f"name it with from_layout=... ({', '.join(layout_names())})",
        params=("from_layout=...",),
    )


def weights_file(directory: Path) -> Path | None:
    for name in ("model.safetensors", "pytorch_model.bin", "model.pth"):
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.pth"))
    return found[0] if found else None


def foreign_arch(
    layout: str, state: Mapping[str, torch.Tensor], config: Mapping[str, Any], arch: str | None
) -> Architecture:
    """The architecture of a dinov2-hub or aimv2-apple checkpoint, from its config or tensors;
    a tensor the layout must have and the file lacks is named."""
    from vitport.convert.engine import ConversionError

    try:
        return _foreign_arch(layout, state, config, arch)
    except KeyError as exc:
        raise ConversionError(
            f"the source lacks tensor '{exc.args[0]}', which every {layout} checkpoint has; "
            "is it complete, and is from_layout right?",
            params=("from_layout",),
        ) from exc


def _foreign_arch(
    layout: str, state: Mapping[str, torch.Tensor], config: Mapping[str, Any], arch: str | None
) -> Architecture:
    return foreign_layout(layout).architecture(state, config, arch)


def foreign_layout(name: str) -> ForeignLayout:
    return next(layout for layout in foreign_layouts() if layout.name == name)


def foreign_preprocessing(layout: str, arch: Architecture) -> Preprocessing:
    """What the family's original release prescribes (its input size, crop and statistics)."""
    return foreign_layout(layout).preprocessing(arch)


def loaded_arch(encoder: Encoder) -> Architecture:
    """The architecture of a model vitport loaded (transformers or timm)."""
    if encoder.family == "timm":
        from vitport.families.timm_vit import conversion_architecture
    else:
        from vitport.families.hf import conversion_architecture
    return conversion_architecture(encoder)


def loaded_preprocessing(encoder: Encoder) -> Preprocessing:
    """The loaded model's eval preprocessing in neutral terms, as its loader read it."""
    if encoder.preprocess.recipe is None:
        raise SpecError(f"{encoder.spec}: its loader gave no preprocessing in neutral terms")
    return encoder.preprocess.recipe


def loaded_state(encoder: Encoder) -> dict[str, torch.Tensor]:
    """A loaded model's tensors under the names of its layout's files."""
    module = encoder.module
    state = {k: v.detach() for k, v in module.state_dict().items()}
    return state if encoder.family == "timm" else file_names(module, state)


def file_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers model's tensors under its files' names, without a head model's prefix."""
    try:  # transformers 5 renames tensors on load; its files keep the published names
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    except ImportError:
        pass
    prefix = f"{model.base_model_prefix}." if hasattr(model, "classifier") else ""
    return {k.removeprefix(prefix): v for k, v in state.items()}


# --- building targets -------------------------------------------------------------------------


def timm_recipe(arch: Architecture, name: str | None = None) -> tuple[str, dict[str, Any]]:
    """A timm architecture and the arguments that give it exactly `arch`."""
    found = _conversion(arch)
    name = timm_aliases().get(name, name) if name else found.timm_name(arch)
    mlp = arch.mlp_hidden * (2 if arch.gated_mlp and found.timm_packed_mlp else 1)
    ratio = mlp / arch.hidden_size
    if int(arch.hidden_size * ratio) != mlp:
        ratio = (mlp + 0.5) / arch.hidden_size
    args: dict[str, Any] = {
        "embed_dim": arch.hidden_size,
        "depth": arch.depth,
        "num_heads": arch.num_heads,
        "mlp_ratio": ratio,
        "patch_size": arch.patch_size,
        "img_size": arch.image_size,
        "num_classes": arch.num_classes,
        "qkv_bias": arch.qkv_bias,
        **found.timm_args(arch),
    }
    if arch.registers:
        args["reg_tokens"] = arch.registers
    return name, args


def _conversion(arch: Architecture) -> Conversion:
    found = conversion(arch.family)
    if found is None:
        raise SpecError(f"no family converts architecture '{arch.family}'")
    return found


def timm_model(name: str, args: Mapping[str, Any], meta: bool = True) -> nn.Module:
    import timm

    if meta:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **args)
    return timm.create_model(name, pretrained=False, **args)


def hf_config(arch: Architecture) -> Any:
    """The transformers config (with its architecture class) that gives exactly `arch`."""
    return _conversion(arch).hf_config(arch)


def hf_model(config: Any, meta: bool = True) -> nn.Module:
    import transformers

    from vitport.families.hf import quiet_transformers

    cls = getattr(transformers, config.architectures[0])
    with quiet_transformers():
        if meta:
            with torch.device("meta"):
                return cls(config)
        return cls(config)


def expected_shapes(
    target: str, arch: Architecture, timm_name: str | None
) -> dict[str, tuple[int, ...]]:
    """Every tensor the target checkpoint must hold, with its shape, as its files name them."""
    if target == "timm":
        name, args = timm_recipe(arch, timm_name)
        model = timm_model(name, args)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model = hf_model(hf_config(arch))
    return {k: tuple(v.shape) for k, v in file_names(model, model.state_dict()).items()}


def write_checkpoint(
    directory: Path,
    target: str,
    arch: Architecture,
    tensors: Mapping[str, torch.Tensor],
    preprocessing: Preprocessing,
    timm_name: str | None = None,
    processor_file: Path | None = None,
) -> None:
    """Write a directory that transformers or timm loads as it is, without vitport."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if target == "timm":
        from timm.models._hub import save_config_for_hf

        name, args = timm_recipe(arch, timm_name)
        save_config_for_hf(
            without_provenance(timm_model(name, args)),
            str(directory / "config.json"),
            model_args=args,
            data_config=preprocessing.timm_data_config(arch.image_size),
        )
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    config = hf_config(arch)
    config.save_pretrained(str(directory))
    if config.architectures[0].endswith("ForImageClassification"):
        prefix = f"{hf_model(config).base_model_prefix}."
        tensors = {k if k.startswith("classifier") else prefix + k: v for k, v in tensors.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if processor_file is not None:
        (directory / "preprocessor_config.json").write_text(processor_file.read_text())
    else:
        preprocessing.hf_processor().save_pretrained(str(directory))


# what timm's registry says of ITS pretrained weights, not of the weights written here
PROVENANCE = (
    "tag",
    "license",
    "hf_hub_id",
    "url",
    "origin_url",
    "paper_ids",
    "paper_name",
    "notes",
)


def without_provenance(model: nn.Module) -> nn.Module:
    """`model` with its pretrained config stripped of the registry's provenance (weights tag,
    licence, origin), so that a written config states only what is known of its weights."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    model.pretrained_cfg = {k: v for k, v in cfg.items() if k not in PROVENANCE}
    return model


def write_foreign_as_timm(
    directory: Path, arch: Architecture, state: Mapping[str, torch.Tensor], pre: Preprocessing
) -> None:
    """A timm directory holding a foreign checkpoint as it is: timm's checkpoint filter reads it,
    so loading it gives the source's own function, independent of vitport's tables."""
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    directory.mkdir(parents=True, exist_ok=True)
    name, args = timm_recipe(arch)
    save_config_for_hf(
        without_provenance(timm_model(name, args)),
        str(directory / "config.json"),
        model_args=args,
        data_config=pre.timm_data_config(arch.image_size),
    )
    tensors = {k: v.contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from exc
