"""SigLIP vision tower (transformers `SiglipVisionModel`, and the vision half of a full
`SiglipModel`: the layout of google/siglip-so400m-patch14-384).

No class token, learned position embeddings (transformers interpolates them at run time),
tanh-approximated GELU MLPs (`gelu_pytorch_tanh`, as trained: the erf-gelu fix leaves them be),
and a LayerNorm on the output tokens (`post_layernorm`). It pools with its attention-pooling head
(`head`: one learned probe attends over the tokens, then a LayerNorm and an MLP); a tower saved
without the head (`vision_use_head=False`) averages its tokens. The patch need not divide the
input: so400m's 384 px over 14 px patches is a 27x27 grid, the 6 px margin unseen, as trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vitport.families.base import (
    Family,
    TinyModel,
    config_layout,
    mean_pool,
    refuse_classifiers,
    stated_architecture,
    tiny_transformers,
)

if TYPE_CHECKING:
    from torch import nn


def model_class(config: Mapping[str, Any]) -> str:
    """The vision tower alone, from a tower's checkpoint or a full SiglipModel's."""
    refuse_classifiers(config, "SigLIP", "SiglipVisionModel")
    return "SiglipVisionModel"


def head_flops(module: nn.Module, tokens: int) -> float:
    """The attention-pooling head, per image over `tokens` tokens: one probe query (q and out
    projections), keys and values of every token, its scores and weighted sum, and the MLP on
    the pooled token."""
    head = getattr(module, "head", None)
    if head is None:
        return 0.0
    d = head.attention.embed_dim
    m = head.mlp.fc1.out_features
    projections = 2.0 * d * d * 2 + 2.0 * tokens * d * 2 * d
    attention = 2.0 * tokens * d * 2
    return projections + attention + 2.0 * d * m * 2


def _processor() -> Any:
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": 32, "width": 32}, resample=3)


FAMILY = Family(
    name="siglip",
    title="SigLIP vision tower",
    model_types=("siglip_vision_model", "siglip"),
    classes=("SiglipVisionModel", "SiglipVisionConfig", "SiglipImageProcessor"),
    model_class=model_class,
    layout=config_layout(has_cls=False),
    architecture=stated_architecture(gated=lambda _config: False),
    forward_kwargs={"interpolate_pos_encoding": True},
    pool=mean_pool,
    head_flops=head_flops,
    tiny=(
        TinyModel(
            "siglip",
            # 32 px over 14 px patches: a 2x2 grid with a margin, as so400m's 384 over 14
            tiny_transformers(
                "SiglipVisionModel",
                "SiglipVisionConfig",
                _processor,
                intermediate_size=64,
                image_size=32,
                patch_size=14,
            ),
            0,
            0,
            (2, 2),
        ),
    ),
)
