"""CLIP vision tower (transformers `CLIPVisionModel`, `CLIPVisionModelWithProjection`, and the vision
half of a full `CLIPModel`: the layout of openai/clip-vit-large-patch14).

A class token, learned position embeddings (transformers interpolates them at run time), a
LayerNorm before the first block (`pre_layrnorm`) and quick-GELU MLPs. The output tokens are the
last block's, un-normalised: `post_layernorm` normalises the class token alone, for the pooler.

Where the outputs go (the Features contract): `cls` and `patches` are the last block's tokens
(transformers' `last_hidden_state`); `pooled` is `image_embeds`, the post-LayerNorm class token
through the visual projection, where the checkpoint has the projection (what CLIP matches with
text), else the post-LayerNorm class token itself (`pooler_output`). A full `CLIPModel` loads as
its vision tower with the projection; the text tower is not read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vitport.families.base import (
    Family,
    TinyModel,
    config_layout,
    refuse_classifiers,
    stated_architecture,
    tiny_transformers,
)

if TYPE_CHECKING:
    import torch
    from torch import nn


def model_class(config: Mapping[str, Any]) -> str:
    """The vision tower with the projection, except for a checkpoint saved without it."""
    architectures = refuse_classifiers(config, "CLIP", "CLIPVisionModel")
    plain = (
        config.get("model_type") == "clip_vision_model"
        and "CLIPVisionModelWithProjection" not in architectures
    )
    return "CLIPVisionModel" if plain else "CLIPVisionModelWithProjection"


def pool(output: Any, tokens: torch.Tensor) -> torch.Tensor:
    """`image_embeds` where the projection exists, else the post-LayerNorm class token."""
    embeds = getattr(output, "image_embeds", None)
    return embeds if embeds is not None else output.pooler_output


def projection_flops(module: nn.Module, tokens: int) -> float:
    """The visual projection (one matrix on the pooled class token), per image."""
    projection = getattr(module, "visual_projection", None)
    return 2.0 * projection.in_features * projection.out_features if projection is not None else 0.0


def _processor() -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, resample=3
    )


FAMILY = Family(
    name="clip",
    title="CLIP vision tower",
    model_types=("clip_vision_model", "clip"),
    classes=(
        "CLIPVisionModel",
        "CLIPVisionModelWithProjection",
        "CLIPVisionConfig",
        "CLIPImageProcessor",
    ),
    model_class=model_class,
    layout=config_layout(has_cls=True),
    architecture=stated_architecture(gated=lambda _config: False),
    forward_kwargs={"interpolate_pos_encoding": True},
    final_norm=lambda _backbone: None,
    pool=pool,
    head_flops=projection_flops,
    tiny=(
        TinyModel(
            "clip",
            tiny_transformers(
                "CLIPVisionModelWithProjection",
                "CLIPVisionConfig",
                _processor,
                intermediate_size=64,
                image_size=28,
                patch_size=14,
                projection_dim=16,
            ),
            1,
            0,
            (2, 2),
        ),
    ),
)
