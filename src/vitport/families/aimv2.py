"""AIMv2 (transformers `Aimv2VisionModel`, or the vision tower of `Aimv2Model`; timm's
`aimv2_*`; Apple's original release).

No class token, fixed learned position embeddings (one input size), RMSNorm and a SwiGLU MLP. It
pools with its attention-pooling head where the checkpoint has one, else averages its tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vitport.convert.engine import Rule, Table, rename, split
from vitport.encoder import Architecture
from vitport.families.base import (
    OPENAI_CLIP,
    Conversion,
    Family,
    ForeignLayout,
    Preprocessing,
    TinyModel,
    bit_processor,
    config_layout,
    count_blocks,
    heads_from_width,
    mean_pool,
    square_grid,
    stated_architecture,
    timm_heads,
    tiny_transformers,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

HEAD_WIDTH = 128  # for Apple's checkpoints without a config

_BLOCK = "encoder.layers.{i}"

APPLE_HF = Table(
    name="aimv2-apple-to-hf/aimv2",
    version=1,
    source="aimv2-apple",
    target="hf",
    family="aimv2",
    rules=(
        rename("preprocessor.patchifier.proj", "embeddings.patch_embed"),
        rename("preprocessor.patchifier.norm", "embeddings.rms_norm"),
        Rule("reshape", ("preprocessor.pos_embed",), ("embeddings.position_embedding.weight",)),
        rename("trunk.blocks.{i}.norm_1", f"{_BLOCK}.rms_norm1"),
        split(
            "trunk.blocks.{i}.attn.qkv",
            f"{_BLOCK}.attention.q_proj",
            f"{_BLOCK}.attention.k_proj",
            f"{_BLOCK}.attention.v_proj",
        ),
        rename("trunk.blocks.{i}.attn.proj", f"{_BLOCK}.attention.out_proj"),
        rename("trunk.blocks.{i}.norm_2", f"{_BLOCK}.rms_norm2"),
        # SwiGLU: fc2(silu(fc1(x)) * fc3(x)) is down(silu(gate(x)) * up(x))
        rename("trunk.blocks.{i}.mlp.fc1", f"{_BLOCK}.ffn.gate_proj"),
        rename("trunk.blocks.{i}.mlp.fc3", f"{_BLOCK}.ffn.up_proj"),
        rename("trunk.blocks.{i}.mlp.fc2", f"{_BLOCK}.ffn.down_proj"),
        rename("trunk.post_trunk_norm", "rms_norm"),
    ),
)


def hf_config(arch: Architecture) -> Any:
    import transformers

    config = transformers.Aimv2VisionConfig(
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.depth,
        num_attention_heads=arch.num_heads,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        intermediate_size=arch.mlp_hidden,
        rms_norm_eps=arch.norm_eps,
        qkv_bias=arch.qkv_bias,
        mlp_bias=False,
        use_head=False,
    )
    config.architectures = ["Aimv2VisionModel"]
    return config


def head_flops(backbone: nn.Module, tokens: int) -> float:
    """The attention-pooling head, where the checkpoint has one: keys and values of every token
    (2·D² each) and one learned query's attention over them (4·D per token), then the output
    projection (2·D²)."""
    if not getattr(backbone.config, "use_head", False):
        return 0.0
    d = float(backbone.config.hidden_size)
    return tokens * (4 * d * d + 4 * d) + 2 * d * d


def is_timm_aimv2(module: nn.Module) -> bool:
    return type(module.blocks[0].mlp).__name__ == "SwiGLU"


def apple_architecture(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any], arch_name: str | None
) -> Architecture:
    """An Apple checkpoint's architecture, from its config.json and its tensors."""
    hidden = state["preprocessor.patchifier.proj.weight"].shape[0]
    heads = config.get("num_attention_heads") or (
        timm_heads(arch_name) if arch_name else heads_from_width(hidden, HEAD_WIDTH, "aimv2")
    )
    return Architecture(
        family="aimv2",
        hidden_size=hidden,
        depth=count_blocks(state, "trunk.blocks."),
        num_heads=int(heads),
        mlp_hidden=state["trunk.blocks.0.mlp.fc1.weight"].shape[0],
        patch_size=state["preprocessor.patchifier.proj.weight"].shape[-1],
        grid=square_grid(state["preprocessor.pos_embed"].shape[-2], "preprocessor.pos_embed"),
        norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        qkv_bias="trunk.blocks.0.attn.qkv.bias" in state,
        gated_mlp=True,
    )


def is_apple_config(config: Mapping[str, Any]) -> bool:
    """Apple's release names its model type like transformers' multimodal AIMv2, without the
    vision config transformers writes."""
    return config.get("model_type") == "aimv2" and "vision_config" not in config


FAMILY = Family(
    name="aimv2",
    title="AIMv2",
    model_types=("aimv2_vision_model", "aimv2"),
    classes=("Aimv2VisionModel", "Aimv2VisionConfig"),
    layout=config_layout(has_cls=False),
    architecture=stated_architecture(gated=lambda _config: True),
    resizable=False,
    vision_tower=lambda model: model.vision_model if hasattr(model, "vision_model") else model,
    pool=mean_pool,
    head_flops=head_flops,
    conversions=(
        Conversion(
            key="aimv2",
            model_types=("aimv2_vision_model", "aimv2"),
            tables=(APPLE_HF,),
            hf_config=hf_config,
            timm_name=lambda _arch: "aimv2_large_patch14_224",
            timm_match=is_timm_aimv2,
        ),
    ),
    foreign=(
        ForeignLayout(
            name="aimv2-apple",
            sentinel="preprocessor.patchifier.proj.weight",
            architecture=apple_architecture,
            preprocessing=lambda arch: Preprocessing(arch.image_size, 1.0, *OPENAI_CLIP),
            recognise=is_apple_config,
        ),
    ),
    tiny=(
        TinyModel(
            "aimv2",
            tiny_transformers(
                "Aimv2VisionModel",
                "Aimv2VisionConfig",
                lambda: bit_processor(28, 28),
                intermediate_size=64,
                image_size=28,
                patch_size=14,
            ),
            0,
            0,
            (2, 2),
        ),
    ),
)
