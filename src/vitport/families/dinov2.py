"""DINOv2, with and without registers (transformers `Dinov2Model`, `Dinov2WithRegistersModel`;
timm's `vit_*_dinov2`; the torch-hub release of facebookresearch/dinov2).

A class token, optional register tokens, learned position embeddings interpolated at run time,
LayerScale, and a GELU MLP or (ViT-g) a fused SwiGLU. It pools the normalised class token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from vitport.convert.engine import Rule, Table, fill, rename, split
from vitport.encoder import Architecture
from vitport.errors import SpecError
from vitport.families.base import (
    IMAGENET,
    Conversion,
    Family,
    ForeignLayout,
    Preprocessing,
    TinyModel,
    bit_processor,
    cls_pool,
    config_layout,
    count_blocks,
    heads_from_width,
    mlp_width,
    square_grid,
    timm_heads,
    tiny_transformers,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

MASK_TOKEN = (
    "mask_token is used only by masked-image training, never at inference; "
    "it does not change the function"
)
HEAD_WIDTH = 64  # for torch-hub checkpoints, which come without a config
TIMM_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}

# torch-hub names of the release, as timm architectures (for --arch)
HUB_ARCHS = {
    f"dinov2_vit{s}14{r}": f"vit_{size}_patch14{'_reg4' if r else ''}_dinov2"
    for s, size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
    for r in ("", "_reg")
}

_BLOCK = "encoder.layer.{i}"
_ATTN = _BLOCK + ".attention.attention"


def _block_rules(src: str, qkv: str, proj: str, ls: str) -> tuple[Rule, ...]:
    """A DINOv2 block (timm and torch-hub name its parts alike) into transformers'."""
    b, h = src + ".{i}", _BLOCK
    return (
        rename(f"{b}.norm1", f"{h}.norm1"),
        split(f"{b}.attn.{qkv}", f"{_ATTN}.query", f"{_ATTN}.key", f"{_ATTN}.value"),
        rename(f"{b}.attn.{proj}", f"{h}.attention.output.dense"),
        rename(f"{b}.{ls}1.gamma", f"{h}.layer_scale1.lambda1"),
        rename(f"{b}.norm2", f"{h}.norm2"),
        rename(f"{b}.mlp.fc1", f"{h}.mlp.fc1"),
        rename(f"{b}.mlp.fc2", f"{h}.mlp.fc2"),
        rename(f"{b}.{ls}2.gamma", f"{h}.layer_scale2.lambda1"),
    )


_EMBED = (
    rename("patch_embed.proj", "embeddings.patch_embeddings.projection"),
    rename("norm", "layernorm"),
)

TIMM_HF = Table(
    name="timm-to-hf/dinov2",
    version=1,
    source="timm",
    target="hf",
    family="dinov2",
    rules=(
        rename("cls_token", "embeddings.cls_token"),
        rename("pos_embed", "embeddings.position_embeddings"),
        fill("embeddings.mask_token", MASK_TOKEN),
        *_EMBED,
        *_block_rules("blocks", "qkv", "proj", "ls"),
    ),
)

# timm's register models add the class position to the class token (no_embed_class); transformers
# adds it with the patch positions. Going to transformers the class position becomes zero.
TIMM_HF_REG = Table(
    name="timm-to-hf/dinov2-registers",
    version=1,
    source="timm",
    target="hf",
    family="dinov2-registers",
    rules=(
        Rule(
            "unfold_class_pos",
            ("cls_token", "pos_embed"),
            ("embeddings.cls_token", "embeddings.position_embeddings"),
        ),
        rename("reg_token", "embeddings.register_tokens"),
        fill("embeddings.mask_token", MASK_TOKEN),
        *_EMBED,
        *_block_rules("blocks", "qkv", "proj", "ls"),
    ),
)

HUB_HF = Table(
    name="dinov2-hub-to-hf/dinov2",
    version=1,
    source="dinov2-hub",
    target="hf",
    family="dinov2",
    rules=(
        rename("cls_token", "embeddings.cls_token"),
        rename("pos_embed", "embeddings.position_embeddings"),
        rename("register_tokens", "embeddings.register_tokens"),
        rename("mask_token", "embeddings.mask_token"),
        *_EMBED,
        *_block_rules("blocks", "qkv", "proj", "ls"),
        # ViT-g: fused SwiGLU, gate and value in one matrix, in the order transformers expects
        rename("blocks.{i}.mlp.w12", "encoder.layer.{i}.mlp.weights_in"),
        rename("blocks.{i}.mlp.w3", "encoder.layer.{i}.mlp.weights_out"),
    ),
)

# The hub layout is the same with or without registers; the registers rule fires when they exist.
HUB_HF_REG = replace(HUB_HF, name="dinov2-hub-to-hf/dinov2-registers", family="dinov2-registers")


def architecture(config: Any, backbone: nn.Module) -> Architecture:
    """The config states an MLP ratio; the width (SwiGLU shrinks it) is read off the module."""
    gated = bool(config.use_swiglu_ffn)
    return Architecture(
        hidden_size=int(config.hidden_size),
        depth=int(config.num_hidden_layers),
        num_heads=int(config.num_attention_heads),
        mlp_hidden=mlp_width(backbone.encoder.layer[0].mlp),
        gated_mlp=gated,
        patch_size=int(config.patch_size),
        in_chans=int(getattr(config, "num_channels", 3)),
    )


def hf_config(arch: Architecture) -> Any:
    import transformers

    ratio = 4 if arch.gated_mlp else arch.mlp_hidden / arch.hidden_size
    if ratio != int(ratio):
        raise SpecError(
            f"transformers' DINOv2 needs an MLP width that is a whole multiple of the "
            f"hidden size; this model has {arch.mlp_hidden} for {arch.hidden_size}"
        )
    kwargs = {
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.depth,
        "num_attention_heads": arch.num_heads,
        "image_size": arch.image_size,
        "patch_size": arch.patch_size,
        "num_channels": arch.in_chans,
        "qkv_bias": arch.qkv_bias,
        "mlp_ratio": int(ratio),
        "layer_norm_eps": arch.norm_eps,
        "use_swiglu_ffn": arch.gated_mlp,
    }
    if arch.family == "dinov2-registers":
        config = transformers.Dinov2WithRegistersConfig(
            **kwargs, num_register_tokens=arch.registers
        )
        config.architectures = ["Dinov2WithRegistersModel"]
    else:
        config = transformers.Dinov2Config(**kwargs)
        config.architectures = ["Dinov2Model"]
    return config


def timm_name(arch: Architecture) -> str:
    size = "giant" if arch.gated_mlp else TIMM_SIZES.get(arch.hidden_size, "small")  # ViT-g: SwiGLU
    return f"vit_{size}_patch14{'_reg4' if arch.registers else ''}_dinov2"


def timm_match(registers: bool) -> Callable[[nn.Module], bool]:
    """A timm ViT with LayerScale and no SwiGLU, with or without register tokens."""

    def match(module: nn.Module) -> bool:
        from torch import nn

        block = module.blocks[0]
        layer_scale = not isinstance(getattr(block, "ls1", nn.Identity()), nn.Identity)
        has_registers = int(getattr(module, "num_reg_tokens", 0)) > 0
        swiglu = type(block.mlp).__name__ == "SwiGLU"
        return layer_scale and not swiglu and has_registers == registers

    return match


def hub_architecture(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any], arch_name: str | None
) -> Architecture:
    """A torch-hub checkpoint's architecture, from its tensors."""
    hidden = state["cls_token"].shape[-1]
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    key = "dinov2-registers" if registers else "dinov2"
    gated = "blocks.0.mlp.w12.weight" in state
    fc1 = state["blocks.0.mlp.w12.weight" if gated else "blocks.0.mlp.fc1.weight"]
    return Architecture(
        family=key,
        hidden_size=hidden,
        depth=count_blocks(state, "blocks."),
        num_heads=timm_heads(arch_name) if arch_name else heads_from_width(hidden, HEAD_WIDTH, key),
        mlp_hidden=fc1.shape[0] // (2 if gated else 1),
        patch_size=state["patch_embed.proj.weight"].shape[-1],
        grid=square_grid(state["pos_embed"].shape[1] - 1, "pos_embed"),
        registers=registers,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        gated_mlp=gated,
    )


_COMMON = {
    "hf_config": hf_config,
    "timm_name": timm_name,
    "timm_args": lambda _arch: {"init_values": 1.0},  # LayerScale exists; values from the file
    "timm_packed_mlp": True,
}
_TINY = {"image_size": 28, "patch_size": 14}

FAMILY = Family(
    name="dinov2",
    title="DINOv2",
    model_types=("dinov2", "dinov2_with_registers"),
    classes=(
        "Dinov2Model",
        "Dinov2Config",
        "Dinov2WithRegistersModel",
        "Dinov2WithRegistersConfig",
    ),
    layout=config_layout(has_cls=True),
    architecture=architecture,
    pool=cls_pool,
    preprocessing=Preprocessing(224, 224 / 256, *IMAGENET),
    conversions=(
        Conversion(
            key="dinov2",
            model_types=("dinov2",),
            tables=(TIMM_HF, TIMM_HF.inverse("hf-to-timm/dinov2"), HUB_HF),
            timm_match=timm_match(registers=False),
            hf_prefix="dinov2.",
            **_COMMON,
        ),
        Conversion(
            key="dinov2-registers",
            model_types=("dinov2_with_registers",),
            tables=(TIMM_HF_REG, TIMM_HF_REG.inverse("hf-to-timm/dinov2-registers"), HUB_HF_REG),
            timm_match=timm_match(registers=True),
            hf_prefix="dinov2_with_registers.",
            **_COMMON,
        ),
    ),
    foreign=(
        ForeignLayout(
            name="dinov2-hub",
            sentinel="mask_token",
            architecture=hub_architecture,
            preprocessing=lambda _arch: Preprocessing(224, 224 / 256, *IMAGENET),
            timm_aliases=HUB_ARCHS,
        ),
    ),
    tiny=(
        TinyModel(
            "dinov2",
            tiny_transformers(
                "Dinov2Model", "Dinov2Config", lambda: bit_processor(28, 32), **_TINY
            ),
            1,
            0,
            (2, 2),
        ),
        TinyModel(
            "dinov2_with_registers",
            tiny_transformers(
                "Dinov2WithRegistersModel",
                "Dinov2WithRegistersConfig",
                lambda: bit_processor(28, 32),
                **_TINY,
                num_register_tokens=4,
            ),
            1,
            4,
            (2, 2),
        ),
    ),
)
