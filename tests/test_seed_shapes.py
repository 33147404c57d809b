"""Each seed model's family, at its real width and input size, gives the shapes the seed reports.

Depth is cut to one block to keep CI fast; token counts and widths do not depend on depth.
"""

from __future__ import annotations

import pytest
import torch

import vitport
from vitport.families.base import bit_processor, square_processor
from vitport.families.base import tiny_transformers as hf_builder
from vitport.infer import infer


def timm_reg4_at_518(path):
    import timm
    from timm.models._hub import save_for_hf

    args = {"depth": 1}
    torch.manual_seed(0)
    save_for_hf(timm.create_model("vit_small_patch14_reg4_dinov2", **args), path, model_args=args)


SEEDS = {
    # seed 000: facebook/dinov2-large, 1 + 256 tokens x 1024
    "dinov2-large": (
        hf_builder(
            "Dinov2Model",
            "Dinov2Config",
            lambda: bit_processor(224, 256),
            hidden_size=1024,
            num_attention_heads=16,
            num_hidden_layers=1,
            image_size=518,
            patch_size=14,
        ),
        {"cls": (1, 1024), "patches": (1, 256, 1024)},
    ),
    # seed 001: dinov3-vits16, 1 CLS + 4 registers + 196 patches x 384
    "dinov3-vits16": (
        hf_builder(
            "DINOv3ViTModel",
            "DINOv3ViTConfig",
            lambda: square_processor(224),
            hidden_size=384,
            num_attention_heads=6,
            num_hidden_layers=1,
            intermediate_size=1536,
            patch_size=16,
            num_register_tokens=4,
        ),
        {"cls": (1, 384), "registers": (1, 4, 384), "patches": (1, 196, 384)},
    ),
    # seed 002: timm vit_small_patch14_reg4_dinov2 at 518: 1 + 4 + 1369 x 384
    "timm-vits14-reg4-518": (
        timm_reg4_at_518,
        {"cls": (1, 384), "registers": (1, 4, 384), "patches": (1, 1369, 384)},
    ),
    # seed 003: google/vit-base-patch16-224-in21k: 1 + 196 x 768
    "vit-base-16": (
        hf_builder(
            "ViTModel",
            "ViTConfig",
            lambda: square_processor(224),
            hidden_size=768,
            num_attention_heads=12,
            num_hidden_layers=1,
            intermediate_size=3072,
            image_size=224,
            patch_size=16,
        ),
        {"cls": (1, 768), "patches": (1, 196, 768)},
    ),
    # seed 004: AIMv2-L/14 at 224: 256 patches x 1024, no CLS
    "aimv2-large-14": (
        hf_builder(
            "Aimv2VisionModel",
            "Aimv2VisionConfig",
            lambda: bit_processor(224, 224),
            hidden_size=1024,
            num_attention_heads=8,
            num_hidden_layers=1,
            intermediate_size=2816,
            image_size=224,
            patch_size=14,
        ),
        {"patches": (1, 256, 1024)},
    ),
}


@pytest.mark.parametrize("name", list(SEEDS))
def test_seed_shapes(name, tmp_path, photos):
    build, expected = SEEDS[name]
    build(tmp_path)
    feats = infer(vitport.load(str(tmp_path)), photos[:1]).features
    got = {k: v for k, v in feats.shapes().items() if k in ("cls", "registers", "patches")}
    assert got == expected
