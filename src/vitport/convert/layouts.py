"""Checkpoint layouts: recognise one by its keys, describe its architecture, build and write one.

Layouts: ``hf`` (transformers), ``timm``, ``dinov2-hub`` (facebookresearch/dinov2 torch-hub
release) and ``aimv2-apple`` (Apple's original AIMv2 release). The last two are read only; timm
reads both through its checkpoint filter, which makes it their reference function.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitport.encoder import Architecture, Encoder
from vitport.errors import SpecError, WeightsError

LAYOUTS = ("hf", "timm", "dinov2-hub", "aimv2-apple")
TARGETS = ("hf", "timm", "onnx")

# A key only that layout has, checked in order (as timm's checkpoint filter does).
SENTINELS = (
    ("aimv2-apple", "preprocessor.patchifier.proj.weight"),
    ("dinov2-hub", "mask_token"),
    ("hf", "embeddings.patch_embeddings.projection.weight"),
    ("hf", "embeddings.patch_embed.weight"),
    ("timm", "patch_embed.proj.weight"),
)
HF_PREFIXES = ("vit.", "dinov2.", "dinov2_with_registers.")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HEAD_WIDTH = {"dinov2": 64, "dinov2-registers": 64, "aimv2": 128}  # for checkpoints without config

# torch-hub names of the DINOv2 release, as timm architectures (for --arch)
HUB_ARCHS = {
    f"dinov2_vit{s}14{r}": f"vit_{size}_patch14{'_reg4' if r else ''}_dinov2"
    for s, size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
    for r in ("", "_reg")
}
TIMM_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}


@dataclass(frozen=True)
class Preprocessing:
    """Eval preprocessing in neutral terms: resize the short side, centre-crop `size`, normalise."""

    size: int
    crop_pct: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    @property
    def resize(self) -> int:
        return round(self.size / self.crop_pct)

    def hf_processor(self) -> Any:
        from transformers import BitImageProcessor

        return BitImageProcessor(
            do_resize=True,
            size={"shortest_edge": self.resize},
            do_center_crop=True,
            crop_size={"height": self.size, "width": self.size},
            image_mean=list(self.mean),
            image_std=list(self.std),
            resample=3 if self.interpolation == "bicubic" else 2,
        )

    def timm_data_config(self, size: int) -> dict[str, Any]:
        return {
            "input_size": (3, size, size),
            "crop_pct": self.crop_pct,
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "interpolation": self.interpolation,
        }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def detect_layout(keys: Iterable[str]) -> str:
    found = {k.removeprefix(p) for k in keys for p in ("", *HF_PREFIXES) if k.startswith(p)}
    for layout, key in SENTINELS:
        if key in found:
            return layout
    sample = ", ".join(sorted(found)[:3])
    raise SpecError(
        f"cannot tell the checkpoint layout from its keys ({sample}, ...); "
        f"name it with --from ({', '.join(LAYOUTS)})"
    )


def weights_file(directory: Path) -> Path | None:
    for name in ("model.safetensors", "pytorch_model.bin", "model.pth"):
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.pth"))
    return found[0] if found else None


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """1 + the highest block index under `prefix`, so a block missing a tensor still counts."""
    found = [re.match(rf"{re.escape(prefix)}(\d+)\.", k) for k in state]
    return 1 + max((int(m.group(1)) for m in found if m), default=-1)


def _grid(positions: int, what: str) -> int:
    side = math.isqrt(positions)
    if side * side != positions:
        raise WeightsError(f"{what} holds {positions} positions, not a square grid")
    return side


def timm_heads(name: str) -> int:
    """The head count of a timm architecture (torch-hub DINOv2 names accepted)."""
    import timm

    name = HUB_ARCHS.get(name, name)
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except RuntimeError as exc:
        raise SpecError(
            f"--arch {name}: timm has no such architecture (e.g. vit_large_patch14_dinov2, "
            f"or a torch-hub name: {', '.join(sorted(HUB_ARCHS)[:4])}, ...)"
        ) from exc
    return int(model.blocks[0].attn.num_heads)


def _heads(hidden: int, family: str) -> int:
    width = HEAD_WIDTH[family]
    if hidden % width:
        raise SpecError(
            f"cannot tell the head count: the checkpoint has no config and its width {hidden} "
            f"is not a multiple of {family}'s head width {width}; name the architecture with --arch"
        )
    return hidden // width


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
            "is it complete, and is --from right?"
        ) from exc


def _foreign_arch(
    layout: str, state: Mapping[str, torch.Tensor], config: Mapping[str, Any], arch: str | None
) -> Architecture:
    if layout == "dinov2-hub":
        hidden = state["cls_token"].shape[-1]
        registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
        family = "dinov2-registers" if registers else "dinov2"
        gated = "blocks.0.mlp.w12.weight" in state
        fc1 = state["blocks.0.mlp.w12.weight" if gated else "blocks.0.mlp.fc1.weight"]
        return Architecture(
            family=family,
            hidden_size=hidden,
            depth=_count_blocks(state, "blocks."),
            num_heads=timm_heads(arch) if arch else _heads(hidden, family),
            mlp_hidden=fc1.shape[0] // (2 if gated else 1),
            patch_size=state["patch_embed.proj.weight"].shape[-1],
            grid=_grid(state["pos_embed"].shape[1] - 1, "pos_embed"),
            registers=registers,
            qkv_bias="blocks.0.attn.qkv.bias" in state,
            gated_mlp=gated,
        )
    hidden = state["preprocessor.patchifier.proj.weight"].shape[0]
    heads = config.get("num_attention_heads") or (
        timm_heads(arch) if arch else _heads(hidden, "aimv2")
    )
    return Architecture(
        family="aimv2",
        hidden_size=hidden,
        depth=_count_blocks(state, "trunk.blocks."),
        num_heads=int(heads),
        mlp_hidden=state["trunk.blocks.0.mlp.fc1.weight"].shape[0],
        patch_size=state["preprocessor.patchifier.proj.weight"].shape[-1],
        grid=_grid(state["preprocessor.pos_embed"].shape[-2], "preprocessor.pos_embed"),
        norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        qkv_bias="trunk.blocks.0.attn.qkv.bias" in state,
        gated_mlp=True,
    )


def foreign_preprocessing(layout: str, arch: Architecture) -> Preprocessing:
    """What the original releases prescribe: DINOv2's 256/224 ImageNet, AIMv2's CLIP at the
    size of its fixed position embeddings."""
    if layout == "dinov2-hub":
        return Preprocessing(224, 224 / 256, *IMAGENET)
    return Preprocessing(arch.image_size, 1.0, *OPENAI_CLIP)


def loaded_arch(encoder: Encoder) -> Architecture:
    """The architecture of a model vitport loaded (transformers or timm)."""
    module, a = encoder.module, encoder.arch
    registers = encoder.layout.num_registers
    if encoder.family == "timm":
        block = module.blocks[0]
        has_ls = not isinstance(getattr(block, "ls1", nn.Identity()), nn.Identity)
        if type(block.mlp).__name__ == "SwiGLU":
            family = "aimv2"
        elif has_ls:
            family = "dinov2-registers" if registers else "dinov2"
        else:
            family = "vit"
        return replace(
            a,
            family=family,
            grid=int(module.patch_embed.grid_size[0]),
            registers=registers,
            num_classes=int(module.num_classes),
            norm_eps=float(getattr(module.norm, "eps", 1e-6)),
            qkv_bias=block.attn.qkv.bias is not None,
        )
    config = module.config
    model_type = config.model_type
    if model_type == "aimv2":
        config = config.vision_config
    families = {
        "dinov2": "dinov2",
        "dinov2_with_registers": "dinov2-registers",
        "vit": "vit",
        "aimv2_vision_model": "aimv2",
        "aimv2": "aimv2",
    }
    if model_type not in families:
        raise SpecError(
            f"vitport converts DINOv2, ViT and AIMv2 checkpoints; {encoder.spec} is {model_type}"
        )
    logits = hasattr(module, "classifier")
    eps = getattr(config, "layer_norm_eps", None) or getattr(config, "rms_norm_eps", 1e-6)
    return replace(
        a,
        family=families[model_type],
        grid=int(config.image_size) // a.patch_size,
        registers=registers,
        num_classes=int(config.num_labels) if logits else 0,
        norm_eps=float(eps),
        qkv_bias=bool(getattr(config, "qkv_bias", True)),
    )


def loaded_preprocessing(encoder: Encoder) -> Preprocessing:
    """The loaded model's eval preprocessing in neutral terms."""
    settings = encoder.preprocess.settings
    if encoder.family == "timm":
        return Preprocessing(
            size=encoder.image_size[0],
            crop_pct=float(settings.get("crop_pct", 1.0)),
            mean=tuple(settings["mean"]),
            std=tuple(settings["std"]),
            interpolation=str(settings.get("interpolation", "bicubic")),
        )
    crop = settings.get("crop") or settings.get("resize") or {}
    size = int(crop.get("height") or crop.get("shortest_edge") or encoder.image_size[0])
    resize = (settings.get("resize") or {}).get("shortest_edge") or size
    resample = str(settings.get("resample", "3"))
    return Preprocessing(
        size=size,
        crop_pct=size / int(resize),
        mean=tuple(settings.get("mean") or IMAGENET[0]),
        std=tuple(settings.get("std") or IMAGENET[1]),
        interpolation="bilinear" if resample in ("2", "BILINEAR") else "bicubic",
    )


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
    size = "giant" if arch.gated_mlp else TIMM_SIZES.get(arch.hidden_size, "small")  # ViT-g: SwiGLU
    if name is None:
        name = {
            "dinov2": f"vit_{size}_patch14_dinov2",
            "dinov2-registers": f"vit_{size}_patch14_reg4_dinov2",
            "vit": "vit_base_patch16_224",
            "aimv2": "aimv2_large_patch14_224",
        }[arch.family]
    name = HUB_ARCHS.get(name, name)
    packed = arch.gated_mlp and arch.family.startswith("dinov2")  # timm's SwiGLUPacked: fc1 is 2x
    mlp = arch.mlp_hidden * (2 if packed else 1)
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
    }
    if arch.family.startswith("dinov2"):
        args["init_values"] = 1.0  # LayerScale exists; its values come from the checkpoint
    if arch.registers:
        args["reg_tokens"] = arch.registers
    return name, args


def timm_model(name: str, args: Mapping[str, Any], meta: bool = True) -> nn.Module:
    import timm

    if meta:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **args)
    return timm.create_model(name, pretrained=False, **args)


def hf_config(arch: Architecture) -> Any:
    """The transformers config (with its architecture class) that gives exactly `arch`."""
    import transformers

    common = {
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.depth,
        "num_attention_heads": arch.num_heads,
        "image_size": arch.image_size,
        "patch_size": arch.patch_size,
        "qkv_bias": arch.qkv_bias,
    }
    if arch.family.startswith("dinov2"):
        ratio = 4 if arch.gated_mlp else arch.mlp_hidden / arch.hidden_size
        if ratio != int(ratio):
            raise SpecError(
                f"transformers' DINOv2 needs an MLP width that is a whole multiple of the "
                f"hidden size; this model has {arch.mlp_hidden} for {arch.hidden_size}"
            )
        ratio = int(ratio)
        kwargs = {
            **common,
            "mlp_ratio": ratio,
            "layer_norm_eps": arch.norm_eps,
            "use_swiglu_ffn": arch.gated_mlp,
        }
        if arch.family == "dinov2":
            config, cls = transformers.Dinov2Config(**kwargs), "Dinov2Model"
        else:
            config = transformers.Dinov2WithRegistersConfig(
                **kwargs, num_register_tokens=arch.registers
            )
            cls = "Dinov2WithRegistersModel"
    elif arch.family == "vit":
        config = transformers.ViTConfig(
            **common,
            intermediate_size=arch.mlp_hidden,
            layer_norm_eps=arch.norm_eps,
            num_labels=arch.num_classes,
        )
        cls = "ViTForImageClassification"  # no pooler: timm has none to fill it
    else:
        common.pop("qkv_bias")
        config = transformers.Aimv2VisionConfig(
            **common,
            intermediate_size=arch.mlp_hidden,
            rms_norm_eps=arch.norm_eps,
            qkv_bias=arch.qkv_bias,
            mlp_bias=False,
            use_head=False,
        )
        cls = "Aimv2VisionModel"
    config.architectures = [cls]
    return config


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
            timm_model(name, args),
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
        timm_model(name, args),
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
