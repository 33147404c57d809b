"""transformers checkpoints (hub snapshot or local directory), for every family that claims the
checkpoint's model type: the family record says what differs (see `vitport.families.base`)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitport.encoder import Architecture, Encoder, Preprocess, Preprocessing, RawOutput
from vitport.errors import SpecError, UnsupportedModelError, VitportError, WeightsError, one_line
from vitport.families.base import (
    IMAGENET,
    Family,
    conversion_of_model_type,
    convertible_titles,
    family_of_model_type,
    supported_types,
)
from vitport.families.loaded import LoadedModel, check_image_size
from vitport.families.weights import (
    WEIGHT_FILES,
    damaged_weights_error,
    is_unsafe_pickle,
    unsafe_pickle_error,
    weights_file,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

# A model type no family claims, loaded with --trust-remote-code: read the way most ViTs state it.
REMOTE = Family(name="remote", title="remote code", architecture=None)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars for the duration of a load."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise WeightsError(
            f"{path} has no config.json; pass a transformers checkpoint directory "
            "(config.json + model.safetensors) or a timm directory"
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(
            f"{config_file} is not valid JSON ({exc.msg}, line {exc.lineno})"
        ) from exc


def load_dir(path: Path, image_size: int | None, trust_remote_code: bool) -> LoadedModel:
    """Load a transformers checkpoint directory on the CPU in fp32, checking the weights fit."""
    import torch

    raw_config = read_config(path)
    model_type = raw_config.get("model_type")
    family = family_of_model_type(model_type or "")
    if family is None and not trust_remote_code:
        raise UnsupportedModelError(
            f"model type '{model_type}' in {path}/config.json is not supported; "
            f"supported: {supported_types()}, and timm models (timm:NAME)"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise WeightsError(
            f"no weights in {path}: expected model.safetensors (or pytorch_model.bin); "
            "download the full checkpoint, not only its config"
        )
    import transformers

    architectures = raw_config.get("architectures") or []
    named = (family or REMOTE).model_class(raw_config)
    with_head = any(a.endswith("ForImageClassification") for a in [*architectures, named or ""])
    if named is not None:
        auto = getattr(transformers, named)
    else:
        auto = transformers.AutoModelForImageClassification if with_head else transformers.AutoModel
    with quiet_transformers():
        try:
            model, info = auto.from_pretrained(
                str(path),
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                trust_remote_code=trust_remote_code,
                dtype=torch.float32,
            )
        except Exception as exc:  # transformers wraps loading errors in several types
            cause = exc
            while cause is not None and not is_unsafe_pickle(cause):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise unsafe_pickle_error(weights_file(path)) from exc
            if type(exc).__name__ == "SafetensorError":
                raise damaged_weights_error(weights_file(path), exc) from exc
            if not isinstance(exc, (OSError, ValueError)):
                raise
            raise WeightsError(f"could not load {path}: {one_line(exc)}") from exc
    model.eval()
    notes = check_loading(info, path, with_head)
    logits = (
        with_head
        and int(getattr(model.config, "num_labels", 0) or 0) > 0  # 0 labels: no head at all
        and not any(k.startswith("classifier") for k in info["missing_keys"])
    )
    return wrap(model, family or REMOTE, path, image_size, notes, logits)


def check_loading(info: dict[str, Any], path: Path, with_head: bool) -> list[str]:
    """Refuse weights that do not fit; turn a missing classifier head into a note."""
    if info.get("mismatched_keys"):
        name, got, want = sorted(info["mismatched_keys"])[0]
        raise WeightsError(
            f"weights in {path} do not fit the architecture: '{name}' has shape {tuple(got)}, "
            f"config.json expects {tuple(want)}; are config.json and the weights from the same model?"
        )
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("classifier"))
    if missing:
        raise WeightsError(
            f"weights in {path} lack {len(missing)} tensors the architecture needs, first "
            f"'{missing[0]}'; the checkpoint is incomplete or from another model"
        )
    head_missing = any(k.startswith("classifier") for k in info.get("missing_keys", ()))
    if with_head and head_missing:
        return [
            "the classification head has no trained weights in this checkpoint "
            "(randomly initialised); logits are not reported"
        ]
    return []


def wrap(
    model: nn.Module,
    family: Family,
    path: Path,
    image_size: int | None,
    notes: list[str],
    logits: bool,
) -> LoadedModel:
    """Fill the Encoder fields for a loaded transformers model."""
    if family.vision_tower is not None:
        backbone = family.vision_tower(model)
    elif hasattr(model, "classifier"):
        backbone = model.base_model
    else:
        backbone = model
    module = model if logits else backbone  # an untrained head is dropped, not run
    config = backbone.config
    layout = family.layout(config)
    patch = layout.patch_size
    preprocess = hf_preprocess(path, patch, image_size, family, config)
    native = position_grid(backbone, {layout.num_prefix, layout.num_cls, 0})
    run = (preprocess.image_size[0] // patch, preprocess.image_size[1] // patch)
    resampled_from = native if native is not None and native != run else None
    if resampled_from is not None:
        notes = [
            *notes,
            (
                f"position embeddings resampled from the checkpoint's {native[0]}x{native[1]} grid "
                f"({native[0] * patch} px) to {run[0]}x{run[1]} for {preprocess.image_size[0]} px "
                "input (as transformers interpolates them at run time)"
            ),
        ]
    return LoadedModel(
        module=module,
        family=f"transformers/{module.config.model_type}",
        source=str(path),
        forward=make_forward(family, logits),
        layout=layout,
        arch=architecture(family, config, backbone, layout.num_prefix + run[0] * run[1]),
        preprocess=preprocess,
        final_norm=family.final_norm(backbone),
        notes=notes,
        resampled_from=resampled_from,
        roles=family.block_roles,
    )


def position_grid(backbone: nn.Module, prefixes: set[int]) -> tuple[int, int] | None:
    """The square patch grid the checkpoint's learned position embeddings were trained for;
    None for models without them (DINOv3's RoPE)."""
    for name, tensor in [*backbone.named_parameters(), *backbone.named_buffers()]:
        if "position_embedding" not in name or tensor.ndim not in (2, 3):
            continue
        count = tensor.shape[-2]
        for tokens in sorted(count - p for p in prefixes):  # with or without prefix positions
            side = round(tokens**0.5)
            if tokens > 0 and side * side == tokens:
                return (side, side)
    return None


def architecture(family: Family, config: Any, backbone: nn.Module, tokens: int) -> Architecture:
    """The family's reading of its config, with the activation it was trained with and the
    FLOPs of its head over `tokens` tokens."""
    if family.architecture is None:
        arch = stated_architecture(config)
    else:
        arch = family.architecture(config, backbone)
    head = family.head_flops(backbone, tokens)
    activation = arch.activation or str(getattr(config, "hidden_act", "") or "")
    return replace(arch, head_flops=head or arch.head_flops, activation=activation)


def stated_architecture(config: Any) -> Architecture:
    """A config no family claims: the widths it states (an MLP ratio when it gives no width)."""
    hidden = int(config.hidden_size)
    width = getattr(config, "intermediate_size", None) or int(hidden * float(config.mlp_ratio))
    gated = getattr(config, "use_swiglu_ffn", False) or getattr(config, "use_gated_mlp", False)
    return Architecture(
        hidden_size=hidden,
        depth=int(config.num_hidden_layers),
        num_heads=int(config.num_attention_heads),
        mlp_hidden=int(width),
        gated_mlp=bool(gated),
        patch_size=int(config.patch_size),
        in_chans=int(getattr(config, "num_channels", 3)),
    )


def make_forward(
    family: Family, with_logits: bool
) -> Callable[[nn.Module, torch.Tensor], RawOutput]:
    """The family forward: tokens after the final norm, the family's pooled output, logits."""
    kwargs = dict(family.forward_kwargs)
    pooled_of = family.pool

    if not with_logits:

        def forward(module: nn.Module, pixels: torch.Tensor) -> RawOutput:
            out = module(pixel_values=pixels, **kwargs)
            tokens = out.last_hidden_state
            return RawOutput(tokens=tokens, pooled=pooled_of(out, tokens))

        return forward

    def forward_with_head(module: nn.Module, pixels: torch.Tensor) -> RawOutput:
        from vitport.hooks import hooked

        captured: dict[str, Any] = {}
        keep = [(module.base_model, lambda _m, _a, _k, out: captured.setdefault("out", out))]
        with hooked(keep):
            logits = module(pixel_values=pixels, **kwargs).logits
        out = captured["out"]
        tokens = out.last_hidden_state
        return RawOutput(tokens=tokens, pooled=pooled_of(out, tokens), logits=logits)

    return forward_with_head


def hf_preprocess(
    path: Path, patch: int, image_size: int | None, family: Family, config: Any
) -> Preprocess:
    """The checkpoint's own image processor, resized to `image_size` when one is asked for."""
    from transformers import AutoImageProcessor

    try:
        with quiet_transformers():
            processor = AutoImageProcessor.from_pretrained(str(path))
    except (OSError, ValueError):
        processor = None
    if processor is None:
        raise WeightsError(
            f"{path} has no preprocessor_config.json; copy the one published with the model"
        )
    crop = (
        getattr(processor, "crop_size", None)
        if getattr(processor, "do_center_crop", False)
        else None
    )
    crop = {k: v for k, v in dict(crop).items() if v is not None} if crop else None
    size = {k: v for k, v in dict(getattr(processor, "size", None) or {}).items() if v is not None}
    native = crop or size
    default = int(native.get("height") or native.get("shortest_edge") or config.image_size)
    target = image_size or default
    if target != default:  # the checkpoint's own size stands even off the grid (the conv crops)
        check_image_size(target, patch)
    if target != int(config.image_size) and not family.resizable:
        raise VitportError(
            f"{config.model_type} has fixed position embeddings for {config.image_size}px; "
            f"image_size={target} is not possible",
            params=("image_size=",),
        )
    overrides: dict[str, Any] = {}
    if image_size:
        if crop:
            short = size.get("shortest_edge")
            scale = short / crop["height"] if short else 1.0
            overrides["crop_size"] = {"height": target, "width": target}
            overrides["size"] = (
                {"shortest_edge": round(target * scale)}
                if short
                else {"height": target, "width": target}
            )
        elif "shortest_edge" in size:
            overrides["size"] = {"shortest_edge": target}
            overrides["crop_size"] = {"height": target, "width": target}
            overrides["do_center_crop"] = True
        else:
            overrides["size"] = {"height": target, "width": target}

    settings = {
        "processor": type(processor).__name__,
        "resize": overrides.get("size", size),
        "crop": overrides.get("crop_size", crop),
        "mean": list(getattr(processor, "image_mean", []) or []),
        "std": list(getattr(processor, "image_std", []) or []),
        "resample": str(getattr(processor, "resample", "")),
    }
    return Preprocess(
        ProcessorPixels(processor, overrides), (target, target), settings, recipe(settings, target)
    )


def recipe(settings: dict[str, Any], image_size: int) -> Preprocessing:
    """A processor's settings in neutral terms: resize the short side and centre-crop, or resize
    straight to a square where the processor does (no crop, a height and width), then normalise."""
    squash = not settings.get("crop") and "height" in (settings.get("resize") or {})
    crop = settings.get("crop") or settings.get("resize") or {}
    size = int(crop.get("height") or crop.get("shortest_edge") or image_size)
    resize = (settings.get("resize") or {}).get("shortest_edge") or size
    resample = str(settings.get("resample", "3"))
    return Preprocessing(
        size=size,
        crop_pct=size / int(resize),
        mean=tuple(settings.get("mean") or IMAGENET[0]),
        std=tuple(settings.get("std") or IMAGENET[1]),
        interpolation="bilinear" if resample in ("2", "BILINEAR") else "bicubic",
        crop_mode="squash" if squash else "center",
    )


class ProcessorPixels:
    """A transformers image processor with size overrides, as a picklable callable."""

    def __init__(self, processor: Any, overrides: dict[str, Any]) -> None:
        self.processor = processor
        self.overrides = overrides

    def __call__(self, images: list[Any]) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt", **self.overrides)["pixel_values"]


def conversion_architecture(encoder: Encoder) -> Architecture:
    """The full architecture of a loaded transformers model, with the conversion that fits it."""
    module, arch = encoder.module, encoder.arch
    model_type = module.config.model_type
    found = conversion_of_model_type(model_type)
    if found is None:
        raise SpecError(
            f"vitport converts {convertible_titles()} checkpoints; {encoder.spec} is {model_type}"
        )
    config = getattr(module.config, "vision_config", None) or module.config
    logits = hasattr(module, "classifier")
    eps = getattr(config, "layer_norm_eps", None) or getattr(config, "rms_norm_eps", 1e-6)
    return replace(
        arch,
        family=found.key,
        grid=int(config.image_size) // arch.patch_size,
        registers=encoder.layout.num_registers,
        num_classes=int(config.num_labels) if logits else 0,
        norm_eps=float(eps),
        qkv_bias=bool(getattr(config, "qkv_bias", True)),
    )
