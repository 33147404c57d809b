"""timm Vision Transformers: `timm:NAME`, `timm:NAME` + `--weights FILE`, or a timm directory.

One family for every timm ViT (`timm.models.vision_transformer` and kin): timm's own module says
its layout, width and preprocessing. Which conversion a timm model has (DINOv2, ViT, AIMv2) is
each of those families' to say (`Conversion.timm_match`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitport.encoder import (
    Architecture,
    Encoder,
    Preprocess,
    Preprocessing,
    RawOutput,
    TokenLayout,
)
from vitport.errors import HubUnreachableError, SpecError, VitportError, WeightsError, one_line
from vitport.families.base import (
    Family,
    TinyModel,
    conversions,
    convertible_titles,
)
from vitport.families.loaded import LoadedModel, check_image_size
from vitport.families.weights import damaged_weights_error, read_weights

if TYPE_CHECKING:
    import torch
    from torch import nn


def create(
    name: str, weights: Path | None, image_size: int | None, state: dict[str, torch.Tensor] | None
) -> tuple[nn.Module, str]:
    """Build the timm model with its pretrained weights, from the hub, a file or a directory."""
    import timm

    kwargs: dict[str, Any] = {"img_size": image_size} if image_size else {}
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"state_dict": state}
        source = f"timm {name} with weights from {weights}"
    else:
        source = f"timm pretrained {name}"
    if name.startswith("local-dir:"):
        source = f"timm directory {name.removeprefix('local-dir:')}"
    try:
        return timm.create_model(name, pretrained=True, **kwargs), source
    except RuntimeError as exc:
        text = str(exc)
        if text.startswith("Unknown model"):
            raise SpecError(
                f"timm has no model '{name}'; list them with: python -c \"import timm; "
                f"print(timm.list_models('*vit*', pretrained=True))\""
            ) from exc
        if "size mismatch" in text or "Missing key" in text or "Unexpected key" in text:
            raise WeightsError(
                f"weights do not fit timm '{name}': {state_dict_problem(exc)}"
            ) from exc
        raise
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError" and name.startswith("local-dir:"):
            directory = Path(name.removeprefix("local-dir:"))
            raise damaged_weights_error(directory / "model.safetensors", exc) from exc
        if not isinstance(exc, (OSError, ValueError)):
            raise
        if weights is None and "local-dir:" not in name:
            raise HubUnreachableError(
                f"could not fetch timm weights for '{name}' ({type(exc).__name__}); "
                "pass weights=FILE or a local timm directory",
                params=("weights=",),
            ) from exc
        raise WeightsError(f"could not load timm '{name}': {exc}") from exc


def state_dict_problem(error: BaseException) -> str:
    """The first concrete problem in torch's load_state_dict error: a shape, else a missing key."""
    text = str(error)
    shape = r"torch\.Size\(\[([\d, ]*)\]\)"
    mismatch = re.search(
        rf"size mismatch for ([\w.]+): copying a param with shape {shape} from "
        rf"checkpoint, the shape in current model is {shape}",
        text,
    )
    if mismatch:
        name, got, want = mismatch.groups()
        return f"'{name}' has shape [{got}] in the file, the model expects [{want}]"
    for label in ("Missing key(s)", "Unexpected key(s)"):
        block = re.search(re.escape(label) + r" in state_dict: (.*?)(?:\.\s|$)", text, re.S)
        if block:
            keys = re.findall(r'"([^"]+)"', block.group(1))
            return f"{label.lower()} {len(keys)} tensors, first '{keys[0]}'"
    return one_line(error, limit=300)


def tensor_shapes(name: str, state: Mapping[str, torch.Tensor] | None) -> dict[str, tuple]:
    """The shapes of the tensors that set a checkpoint's position grid: from the --weights state,
    or read from a timm directory's weights file without loading the rest."""
    import torch

    keys = ("pos_embed", "cls_token", "reg_token", "patch_embed.proj.weight")
    if state is not None:
        return {k: tuple(state[k].shape) for k in keys if k in state}
    if not name.startswith("local-dir:"):
        return {}
    directory = Path(name.removeprefix("local-dir:"))
    try:
        if (directory / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
                names = set(f.keys())
                return {k: tuple(f.get_slice(k).get_shape()) for k in keys if k in names}
        if (directory / "pytorch_model.bin").is_file():
            found = torch.load(
                str(directory / "pytorch_model.bin"),
                map_location="cpu",
                weights_only=True,
                mmap=True,
            )
            return {k: tuple(found[k].shape) for k in keys if k in found}
    except Exception:  # noqa: BLE001 - an unreadable file: timm's own load says what is wrong
        return {}
    return {}


def checkpoint_grid(shapes: Mapping[str, Sequence[int]]) -> tuple[int, int] | None:
    """(grid side, patch size) of the position embeddings a timm checkpoint holds, or None.

    pos_embed [1, N, C] holds the patch grid, plus the CLS and register positions unless the
    model adds them without position (no_embed_class, as DINOv2 with registers does)."""
    pos, proj = shapes.get("pos_embed"), shapes.get("patch_embed.proj.weight")
    if pos is None or proj is None or len(pos) != 3:
        return None
    prefix = ("cls_token" in shapes) + (shapes["reg_token"][1] if "reg_token" in shapes else 0)
    for positions in (pos[1] - prefix, pos[1]):
        side = math.isqrt(max(positions, 0))
        if side and side * side == positions:
            return side, int(proj[-1])
    return None


def stated_size(name: str) -> tuple[int | None, str]:
    """The input side a timm directory's config.json, or timm's config for NAME, states."""
    import timm

    if name.startswith("local-dir:"):
        path = Path(name.removeprefix("local-dir:")) / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None, ""
        size = config.get("model_args", {}).get("img_size") or config.get("pretrained_cfg", {}).get(
            "input_size"
        )
        where = f"{path}"
    else:
        cfg = timm.models.get_pretrained_cfg(name)
        size = getattr(cfg, "input_size", None) if cfg is not None else None
        where = f"timm's config for {name}"
    if isinstance(size, (list, tuple)):
        size = size[-1]
    return (int(size) if size else None), where


def load(name: str, weights: Path | None, image_size: int | None) -> LoadedModel:
    """A timm ViT at its checkpoint's own position grid, unless `image_size` resamples it
    (then the note and `resampled_from` say from which grid)."""
    import timm
    from torch import nn

    state = read_weights(weights) if weights is not None else None
    native = checkpoint_grid(tensor_shapes(name, state))
    notes, resampled_from = [], None
    if native is not None:
        side, native_patch = native
        native_size = side * native_patch
        stated, where = stated_size(name)
        if image_size and image_size != native_size:
            resampled_from = (side, side)
            notes.append(
                f"position embeddings resampled from the checkpoint's {side}x{side} grid "
                f"({native_size} px) to {image_size // native_patch}x{image_size // native_patch} "
                f"for {image_size} px input"
            )
        elif not image_size and stated and stated != native_size:
            notes.append(
                f"{where} names {stated} px input, but the checkpoint's position embeddings are "
                f"{side}x{side} ({native_size} px): loaded at {native_size} px (--image-size "
                f"{stated} resamples them)"
            )
        image_size = image_size or native_size
    module, source = create(name, weights, image_size, state)
    module.eval()
    if not hasattr(module, "blocks") or not hasattr(module, "forward_features"):
        raise SpecError(
            f"timm model '{name}' is not a Vision Transformer; vitport supports timm ViTs"
        )
    patch = int(module.patch_embed.patch_size[0])
    height, width = (int(s) for s in module.patch_embed.img_size)
    if image_size:
        check_image_size(image_size, patch)
    layout = TokenLayout(
        num_cls=int(getattr(module, "cls_token", None) is not None),
        num_registers=int(getattr(module, "num_reg_tokens", 0)),
        patch_size=patch,
    )
    if layout.num_prefix != module.num_prefix_tokens:
        raise VitportError(f"timm '{name}': cannot tell CLS from register tokens")
    data = timm.data.resolve_model_data_config(module)
    data["input_size"] = (3, height, width)
    transform = timm.data.create_transform(**data, is_training=False)

    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()}
    if module.num_classes and weights is None and name.startswith("local-dir:"):
        notes.append("classification head loaded from the directory")
    return LoadedModel(
        module=module,
        family="timm",
        source=source,
        forward=forward,
        layout=layout,
        arch=architecture(module),
        preprocess=Preprocess(
            TransformPixels(transform),
            (height, width),
            {"processor": "timm", **settings},
            Preprocessing(
                size=height,
                crop_pct=float(settings.get("crop_pct", 1.0)),
                mean=tuple(settings["mean"]),
                std=tuple(settings["std"]),
                interpolation=str(settings.get("interpolation", "bicubic")),
                crop_mode=str(settings.get("crop_mode", "center")),
            ),
        ),
        final_norm=module.norm if not isinstance(module.norm, nn.Identity) else None,
        notes=notes,
        resampled_from=resampled_from,
        roles=FAMILY.block_roles,
    )


class TransformPixels:
    """A timm eval transform applied image by image, as a picklable callable."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, images: list[Any]) -> torch.Tensor:
        import torch

        return torch.stack([self.transform(im) for im in images])


def architecture(module: nn.Module) -> Architecture:
    block = module.blocks[0]
    mlp = block.mlp
    gated = hasattr(mlp, "fc1_g") or type(mlp).__name__ in ("SwiGLU", "GluMlp", "SwiGLUPacked")
    if hasattr(mlp, "fc1_g"):
        hidden = mlp.fc1_g.out_features
    else:
        hidden = mlp.fc1.out_features // (2 if gated else 1)
    return Architecture(
        hidden_size=int(module.embed_dim),
        depth=len(module.blocks),
        num_heads=int(block.attn.num_heads),
        mlp_hidden=int(hidden),
        gated_mlp=gated,
        patch_size=int(module.patch_embed.patch_size[0]),
        in_chans=int(module.patch_embed.proj.in_channels),
        activation=activation_name(getattr(mlp, "act", None)),
    )


def activation_name(act: nn.Module | None) -> str:
    """What a timm MLP's activation computes, in transformers' names ("" if none of them): timm
    spells the same function with several classes, so it is read from what the module does."""
    import torch
    import torch.nn.functional as F

    if act is None:
        return ""
    activations: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "gelu": lambda x: F.gelu(x, approximate="none"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "silu": F.silu,
    }
    x = torch.linspace(-6.0, 6.0, 1201)
    with torch.no_grad():
        try:
            got = act(x)
        except Exception:  # an activation that takes other input: unknown
            return ""
        return next((n for n, f in activations.items() if torch.allclose(got, f(x), atol=1e-6)), "")


def forward(module: nn.Module, pixels: torch.Tensor) -> RawOutput:
    tokens = module.forward_features(pixels)
    pooled = module.forward_head(tokens, pre_logits=True)
    logits = module.get_classifier()(pooled) if module.num_classes else None
    return RawOutput(tokens=tokens, pooled=pooled, logits=logits)


def conversion_architecture(encoder: Encoder) -> Architecture:
    """The full architecture of a loaded timm ViT, with the conversion that fits it."""
    module, registers = encoder.module, encoder.layout.num_registers
    found = next((c for c in conversions() if c.timm_match(module)), None)
    if found is None:
        raise SpecError(
            f"vitport converts {convertible_titles()} checkpoints; {encoder.spec} is a timm "
            f"{type(module.blocks[0]).__name__} model it has no tables for"
        )
    return replace(
        encoder.arch,
        family=found.key,
        grid=int(module.patch_embed.grid_size[0]),
        registers=registers,
        num_classes=int(module.num_classes),
        norm_eps=float(getattr(module.norm, "eps", 1e-6)),
        qkv_bias=module.blocks[0].attn.qkv.bias is not None,
    )


def tiny_reg4(path: Path) -> None:
    """A tiny timm ViT with four registers, saved as a timm directory."""
    import timm
    import torch
    from timm.models._hub import save_for_hf

    # LayerScale at 1 (not timm's 1e-5 init) so that a fault inside a block shows at the output
    args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28, "init_values": 1.0}
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, **args)
    save_for_hf(model, path, model_args=args)


FAMILY = Family(
    name="timm-vit",
    title="timm ViT",
    timm_names=("*",),  # any timm model with ViT blocks; others are refused at load
    loader="timm",
    load=load,
    architecture=lambda _config, module: architecture(module),
    tiny=(TinyModel("timm_vit_reg4", tiny_reg4, 1, 4, (2, 2)),),
)
