"""ViT (transformers `ViTModel`, `ViTForImageClassification`; timm's plain ViTs convert to it).

A class token, learned position embeddings that transformers interpolates at run time, LayerNorm
and a GELU MLP. transformers' pooler (dense + tanh on the class token) is the pooled output where
the model has it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitport.convert.engine import Rule, Table, rename, split
from vitport.encoder import Architecture
from vitport.families.base import (
    Conversion,
    Family,
    TinyModel,
    cls_pool,
    config_layout,
    square_processor,
    stated_architecture,
    tiny_transformers,
)

if TYPE_CHECKING:
    from torch import nn

POOLER = (
    "transformers' ViT pooler (dense + tanh) has no timm counterpart; "
    "timm's pooled output is the normalised class token"
)

_BLOCK = "encoder.layer.{i}"
_ATTN = _BLOCK + ".attention.attention"

TIMM_HF = Table(
    name="timm-to-hf/vit",
    version=1,
    source="timm",
    target="hf",
    family="vit",
    rules=(
        rename("cls_token", "embeddings.cls_token"),
        rename("pos_embed", "embeddings.position_embeddings"),
        rename("patch_embed.proj", "embeddings.patch_embeddings.projection"),
        rename("blocks.{i}.norm1", f"{_BLOCK}.layernorm_before"),
        split("blocks.{i}.attn.qkv", f"{_ATTN}.query", f"{_ATTN}.key", f"{_ATTN}.value"),
        rename("blocks.{i}.attn.proj", f"{_BLOCK}.attention.output.dense"),
        rename("blocks.{i}.norm2", f"{_BLOCK}.layernorm_after"),
        rename("blocks.{i}.mlp.fc1", f"{_BLOCK}.intermediate.dense"),
        rename("blocks.{i}.mlp.fc2", f"{_BLOCK}.output.dense"),
        rename("norm", "layernorm"),
        rename("head", "classifier"),
        Rule("fill", (), ("pooler.dense",), POOLER),
    ),
)


def pooler_flops(backbone: nn.Module, _tokens: int) -> float:
    """transformers' pooler, where the model has one: a dense layer on the class token."""
    pooler = getattr(backbone, "pooler", None)
    if pooler is None:
        return 0.0
    return 2.0 * pooler.dense.in_features * pooler.dense.out_features


def hf_config(arch: Architecture) -> Any:
    import transformers

    config = transformers.ViTConfig(
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.depth,
        num_attention_heads=arch.num_heads,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        qkv_bias=arch.qkv_bias,
        intermediate_size=arch.mlp_hidden,
        layer_norm_eps=arch.norm_eps,
        num_labels=arch.num_classes,
    )
    config.architectures = ["ViTForImageClassification"]  # no pooler: timm has none to fill it
    return config


def is_plain_timm_vit(module: nn.Module) -> bool:
    """A timm ViT without LayerScale and with a plain GELU MLP."""
    from torch import nn

    block = module.blocks[0]
    layer_scale = not isinstance(getattr(block, "ls1", nn.Identity()), nn.Identity)
    return not layer_scale and type(block.mlp).__name__ == "Mlp"


_TINY = {"intermediate_size": 64, "image_size": 32, "patch_size": 16}

FAMILY = Family(
    name="vit",
    title="ViT",
    model_types=("vit",),
    classes=("ViTModel", "ViTForImageClassification", "ViTConfig"),
    layout=config_layout(has_cls=True),
    architecture=stated_architecture(gated=lambda _config: False),
    forward_kwargs={"interpolate_pos_encoding": True},
    pool=cls_pool,
    head_flops=pooler_flops,
    conversions=(
        Conversion(
            key="vit",
            model_types=("vit",),
            tables=(TIMM_HF, TIMM_HF.inverse("hf-to-timm/vit")),
            hf_config=hf_config,
            timm_name=lambda _arch: "vit_base_patch16_224",
            timm_match=is_plain_timm_vit,
            hf_prefix="vit.",
            dropped_groups={POOLER: "pooled"},
        ),
    ),
    tiny=(
        TinyModel(
            "vit",
            tiny_transformers("ViTModel", "ViTConfig", lambda: square_processor(32), **_TINY),
            1,
            0,
            (2, 2),
        ),
        TinyModel(
            "vit_classifier",
            tiny_transformers(
                "ViTForImageClassification",
                "ViTConfig",
                lambda: square_processor(32),
                **_TINY,
                num_labels=10,
            ),
            1,
            0,
            (2, 2),
            has_logits=True,
        ),
    ),
)
