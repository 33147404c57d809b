"""FLOPs from the config: hand counts, published figures, and FlopCounterMode cross-checks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY as TINY_MODELS

from vitport.bench.flops import FlopCount, count_flops_by_profiler, flops_per_image
from vitport.encoder import Architecture


def vit(hidden: int, depth: int, mlp: int, patch: int, gated: bool = False) -> Architecture:
    return Architecture(
        hidden_size=hidden,
        depth=depth,
        num_heads=max(1, hidden // 64),
        mlp_hidden=mlp,
        gated_mlp=gated,
        patch_size=patch,
    )


# --------------------------------------------------------------------------- hand count

TINY = Architecture(
    hidden_size=8, depth=2, num_heads=2, mlp_hidden=32, gated_mlp=False, patch_size=4
)


def test_hand_count_of_a_tiny_vit():
    # image 8x12, patch 4: 2x3 = 6 patches, + 2 prefix tokens = 8 tokens; D = 8, C = 3.
    f = flops_per_image(TINY, (8, 12), num_prefix=2)
    assert f.tokens == 8
    # patch embed: 6 patches x (3*4*4 = 48 inputs) x 8 outputs MACs = 2304 MACs
    assert f.patch_embed == 2 * 2304
    # per block: qkv 8 tokens x 8 x 24 = 1536 MACs, out proj 8 x 8 x 8 = 512 MACs
    assert f.attention_proj == 2 * (2 * (1536 + 512))
    # per block and head (head dim 4): QK^T 8x4 @ 4x8 = 256 MACs, AV 8x8 @ 8x4 = 256 MACs
    assert f.attention_scores == 2 * (2 * 2 * (256 + 256))
    # per block: fc1 8 x 8 x 32 = 2048 MACs, fc2 8 x 32 x 8 = 2048 MACs
    assert f.mlp == 2 * (2 * (2048 + 2048))
    assert f.total == 4608 + 8192 + 4096 + 16384 == 33280
    assert f.gflops == f.total / 1e9
    assert f.gmacs == f.total / 2e9


def test_gated_mlp_has_three_matrices():
    plain = flops_per_image(TINY, (8, 12), 2)
    gated = flops_per_image(Architecture(8, 2, 2, 32, gated_mlp=True, patch_size=4), (8, 12), 2)
    assert gated.mlp == 1.5 * plain.mlp
    assert gated.total - plain.total == 0.5 * plain.mlp


def test_partial_patches_are_dropped_like_a_strided_conv():
    assert flops_per_image(TINY, (11, 15), 0) == flops_per_image(TINY, (8, 12), 0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        flops_per_image(TINY, (3, 3), 1)
    with pytest.raises(ValueError):
        flops_per_image(TINY, (8, 8), -1)


def test_flop_count_round_trips_through_a_dict():
    from dataclasses import asdict

    f = flops_per_image(TINY, (8, 12), 2)
    assert FlopCount(**asdict(f)) == f


# --------------------------------------------------------------------------- published figures

VIT_S14 = vit(384, 12, 1536, 14)
VIT_B16 = vit(768, 12, 3072, 16)
VIT_L14 = vit(1024, 24, 4096, 14)
VIT_S16 = vit(384, 12, 1536, 16)
AIMV2_L14 = vit(1024, 24, 2816, 14, gated=True)

# GFLOPs = 2 x the GMACs timm publishes for the model (its results tables / model cards).
# timm's counter includes a few small terms left out here (norms, the classifier head, layer
# scale); every figure agrees within 0.5%:
#   formula: S/14@224 12.25, S/14@518 93.39 (1 CLS) / 93.77 (1 CLS + 4 registers),
#   B/16@224 35.13, L/14@224 162.02, L/14@518 1013.6 (1 CLS), DINOv3 S/16@224 9.396,
#   AIMv2-L/14@224 164.59.
PUBLISHED = [
    ("vit_small_patch14 @224", VIT_S14, 224, 1, 12.2),
    # vit_small_patch14_dinov2 @518: 1 CLS + 37x37 = 1370 tokens. The register variant (1 + 4
    # prefix tokens) is 0.4% more and also within the tolerance.
    ("vit_small_patch14_dinov2 @518", VIT_S14, 518, 1, 93.5),
    ("vit_small_patch14_reg4_dinov2 @518 vs the no-register figure", VIT_S14, 518, 5, 93.5),
    ("vit_base_patch16_224", VIT_B16, 224, 1, 35.2),
    ("vit_large_patch14 @224", VIT_L14, 224, 1, 162.2),
    ("vit_large_patch14_dinov2 @518", VIT_L14, 518, 1, 1014.0),
    ("DINOv3 ViT-S/16 @224 (1 CLS + 4 registers)", VIT_S16, 224, 5, 9.4),
    # AIMv2: SwiGLU MLP (hidden 2816), no CLS token; its attention-pooling head is not counted.
    ("aimv2_large_patch14_224", AIMV2_L14, 224, 0, 164.6),
]


@pytest.mark.parametrize(
    ("arch", "side", "prefix", "published"),
    [p[1:] for p in PUBLISHED],
    ids=[p[0] for p in PUBLISHED],
)
def test_matches_published_figures(arch, side, prefix, published):
    gflops = flops_per_image(arch, (side, side), prefix).gflops
    assert gflops == pytest.approx(published, rel=0.03)


def test_attention_grows_quadratically_with_tokens():
    small = flops_per_image(VIT_S14, (224, 224), 1)
    large = flops_per_image(VIT_S14, (518, 518), 1)
    tokens = large.tokens / small.tokens
    assert large.attention_scores / small.attention_scores == pytest.approx(tokens**2)
    assert large.mlp / small.mlp == pytest.approx(tokens)


# --------------------------------------------------------------------------- profiler


def test_profiler_counts_cpu_sdpa():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    flops = count_flops_by_profiler(lambda x: F.scaled_dot_product_attention(x, k, v), q)
    assert flops == 2 * 2 * 3 * 5 * 7 * 8 + 2 * 2 * 3 * 5 * 7 * 4


def tiny_dinov2(attn: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=4,
        image_size=28,
        patch_size=14,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return transformers.Dinov2Model(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_formula_agrees_with_profiler_on_tiny_dinov2(attn):
    module = tiny_dinov2(attn)
    arch = Architecture(64, 2, 2, 256, gated_mlp=False, patch_size=14)
    counted = count_flops_by_profiler(module, torch.randn(2, 3, 28, 28)) / 2
    assert counted == pytest.approx(flops_per_image(arch, (28, 28), 1).total, rel=0.02)


def test_formula_agrees_with_profiler_on_tiny_timm_vit():
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    module = VisionTransformer(
        img_size=32,
        patch_size=16,
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_ratio=4,
        num_classes=0,
        reg_tokens=2,
    ).eval()
    arch = Architecture(64, 2, 2, 256, gated_mlp=False, patch_size=16)
    counted = count_flops_by_profiler(module, torch.randn(1, 3, 32, 32))
    assert counted == pytest.approx(flops_per_image(arch, (32, 32), 1 + 2).total, rel=0.02)


def test_formula_agrees_with_profiler_on_tiny_gated_aimv2():
    transformers = pytest.importorskip("transformers")
    # use_head=False: the attention-pooling head is outside the formula by design
    config = transformers.Aimv2VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        use_head=False,
    )
    torch.manual_seed(0)
    module = transformers.Aimv2VisionModel(config).eval()
    arch = Architecture(64, 2, 2, 128, gated_mlp=True, patch_size=14)
    counted = count_flops_by_profiler(module, torch.randn(1, 3, 28, 28))
    assert counted == pytest.approx(flops_per_image(arch, (28, 28), 0).total, rel=0.02)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_every_family_matches_the_profiler(name, tiny_dir):
    """The config-based count equals torch's FLOP counter on each registered family's real
    forward, its pooling head included (a classifier head is outside the count by convention)."""
    import vitport
    from vitport.bench.flops import count_flops_by_profiler, flops_per_image

    encoder = vitport.load(str(tiny_dir(name)))
    pixels = torch.randn(2, 3, *encoder.image_size)
    counted = flops_per_image(encoder.arch, encoder.image_size, encoder.layout.num_prefix)
    profiled = count_flops_by_profiler(encoder.module, pixels) / 2
    classifier = getattr(encoder.module, "classifier", None)
    if classifier is not None and TINY_MODELS[name].has_logits:
        profiled -= 2 * classifier.in_features * classifier.out_features
    assert profiled == pytest.approx(counted.total, rel=1e-9)


def test_a_family_head_is_counted_once():
    plain = flops_per_image(TINY, (8, 12), 2)
    headed = flops_per_image(replace(TINY, head_flops=100.0), (8, 12), 2)
    assert headed.head == 100.0 and plain.head == 0.0
    assert headed.total == plain.total + 100.0
