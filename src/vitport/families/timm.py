"""timm Vision Transformers: `timm:NAME`, `timm:NAME` + `--weights FILE`, or a timm directory."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitport.encoder import Architecture, Preprocess, RawOutput, TokenLayout
from vitport.errors import HubUnreachableError, SpecError, VitportError, WeightsError
from vitport.families.loaded import LoadedModel, check_image_size
from vitport.families.weights import damaged_weights_error, is_unsafe_pickle, unsafe_pickle_error


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from .pth/.bin with weights-only unpickling."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling and safetensors raise many types
        if is_unsafe_pickle(exc):
            raise unsafe_pickle_error(path) from exc
        if type(exc).__name__ == "SafetensorError":
            raise damaged_weights_error(path, exc) from exc
        raise WeightsError(
            f"could not read weights {path} ({type(exc).__name__}); only safetensors or "
            "weights-only PyTorch files are accepted"
        ) from exc
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def create(name: str, weights: Path | None, image_size: int | None) -> tuple[nn.Module, str]:
    """Build the timm model with its pretrained weights, from the hub, a file or a directory."""
    import timm

    kwargs: dict[str, Any] = {"img_size": image_size} if image_size else {}
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"state_dict": read_weights(weights)}
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
                f"weights do not fit timm '{name}': {state_dict_problem(text)}"
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
                "pass --weights FILE or a local timm directory"
            ) from exc
        raise WeightsError(f"could not load timm '{name}': {exc}") from exc


def state_dict_problem(text: str) -> str:
    """The first concrete problem in torch's load_state_dict error: a shape, else a missing key."""
    shape = r"torch\.Size\(\[([\d, ]*)\]\)"
    mismatch = re.search(rf"size mismatch for ([\w.]+): copying a param with shape {shape} from "
                         rf"checkpoint, the shape in current model is {shape}", text)  # fmt: skip
    if mismatch:
        name, got, want = mismatch.groups()
        return f"'{name}' has shape [{got}] in the file, the model expects [{want}]"
    for label in ("Missing key(s)", "Unexpected key(s)"):
        block = re.search(re.escape(label) + r" in state_dict: (.*?)(?:\.\s|$)", text, re.S)
        if block:
            keys = re.findall(r'"([^"]+)"', block.group(1))
            return f"{label.lower()} {len(keys)} tensors, first '{keys[0]}'"
    return text.strip().splitlines()[0][:300]


def load(name: str, weights: Path | None, image_size: int | None) -> LoadedModel:
    import timm

    module, source = create(name, weights, image_size)
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
    notes = []
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
            TransformPixels(transform), (height, width), {"processor": "timm", **settings}
        ),
        final_norm=module.norm if not isinstance(module.norm, nn.Identity) else None,
        notes=notes,
    )


class TransformPixels:
    """A timm eval transform applied image by image, as a picklable callable."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, images: list[Any]) -> torch.Tensor:
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
    )


def forward(module: nn.Module, pixels: torch.Tensor) -> RawOutput:
    tokens = module.forward_features(pixels)
    pooled = module.forward_head(tokens, pre_logits=True)
    logits = module.get_classifier()(pooled) if module.num_classes else None
    return RawOutput(tokens=tokens, pooled=pooled, logits=logits)
