"""DINOv3 (transformers `DINOv3ViTModel`): a class token, register tokens and rotary position
embeddings (RoPE, so any input size), LayerScale, and a GELU or gated MLP. It pools the normalised
class token. vitport loads it; it has no conversion tables yet.
"""

from __future__ import annotations

from vitport.families.base import (
    Family,
    TinyModel,
    cls_pool,
    config_layout,
    square_processor,
    stated_architecture,
    tiny_transformers,
)

FAMILY = Family(
    name="dinov3",
    title="DINOv3",
    model_types=("dinov3_vit",),
    classes=("DINOv3ViTModel", "DINOv3ViTConfig"),
    layout=config_layout(has_cls=True),
    architecture=stated_architecture(gated=lambda config: config.use_gated_mlp),
    pool=cls_pool,
    tiny=(
        TinyModel(
            "dinov3_vit",
            tiny_transformers(
                "DINOv3ViTModel",
                "DINOv3ViTConfig",
                lambda: square_processor(32),
                intermediate_size=64,
                image_size=32,
                patch_size=16,
                num_register_tokens=4,
            ),
            1,
            4,
            (2, 2),
        ),
    ),
)
