"""The CLIP vision tower (`CLIPVisionModel`, `CLIPVisionModelWithProjection`, and the vision half
of a full `CLIPModel`): the same numbers as transformers' own forward, and every command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from every_command import check_every_command, image_files, profiled_flops

import vitport
from vitport.bench.flops import flops_per_image
from vitport.errors import VitportError
from vitport.fixes import apply_fixes

VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 28,
    "patch_size": 14,
    "projection_dim": 16,
}
TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 16,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}


def processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, resample=3
    )


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """The registered tiny CLIP (with projection), one without, and a full vision+text CLIPModel."""
    import transformers

    made = {"projection": tiny_dir("clip")}
    torch.manual_seed(1)
    plain = tmp_path_factory.mktemp("clip-plain")
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).save_pretrained(plain)
    processor().save_pretrained(plain)
    made["plain"] = plain
    torch.manual_seed(2)
    full = tmp_path_factory.mktemp("clip-full")
    config = transformers.CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(full)
    processor().save_pretrained(full)
    made["full"] = full
    return made


def transformers_forward(kind: str, path: Path, pixels: torch.Tensor, **kwargs) -> dict:
    """What transformers itself gives: tokens, and the pooled output the kind has."""
    import transformers

    with torch.no_grad():
        if kind == "full":
            model = transformers.CLIPModel.from_pretrained(path).eval()
            vision = model.vision_model(pixel_values=pixels, **kwargs)
            pooled = model.visual_projection(vision.pooler_output)
            return {"tokens": vision.last_hidden_state, "pooled": pooled}
        if kind == "projection":
            model = transformers.CLIPVisionModelWithProjection.from_pretrained(path).eval()
            out = model(pixel_values=pixels, **kwargs)
            return {"tokens": out.last_hidden_state, "pooled": out.image_embeds}
        model = transformers.CLIPVisionModel.from_pretrained(path).eval()
        out = model(pixel_values=pixels, **kwargs)
        return {"tokens": out.last_hidden_state, "pooled": out.pooler_output}


@pytest.mark.parametrize("kind", ["projection", "plain", "full"])
def test_outputs_equal_transformers_forward(kind, checkpoints, photos):
    encoder = vitport.load(str(checkpoints[kind]))
    pixels = encoder.preprocess([p.image for p in photos])
    feats = encoder.encode(pixels)
    want = transformers_forward(kind, checkpoints[kind], pixels)
    torch.testing.assert_close(feats.cls, want["tokens"][:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(feats.patches, want["tokens"][:, 1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(feats.pooled, want["pooled"], rtol=0, atol=1e-6)
    assert feats.registers is None and feats.logits is None
    assert feats.pooled.shape == (len(photos), 16 if kind != "plain" else 32)


def test_pooled_is_the_post_layernorm_cls_without_projection(checkpoints, photos):
    encoder = vitport.load(str(checkpoints["plain"]))
    feats = encoder.encode(encoder.preprocess([p.image for p in photos[:2]]))
    with torch.inference_mode():
        post = encoder.module.post_layernorm(feats.cls)
    torch.testing.assert_close(feats.pooled, post, rtol=0, atol=1e-6)


def test_a_larger_input_interpolates_positions_as_transformers_does(checkpoints, photos):
    encoder = vitport.load(str(checkpoints["projection"]), image_size=56)
    pixels = encoder.preprocess([p.image for p in photos[:2]])
    assert tuple(pixels.shape[-2:]) == (56, 56)
    feats = encoder.encode(pixels)
    want = transformers_forward(
        "projection", checkpoints["projection"], pixels, interpolate_pos_encoding=True
    )
    assert feats.grid == (4, 4) and encoder.resampled_from == (2, 2)
    torch.testing.assert_close(feats.patches, want["tokens"][:, 1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(feats.pooled, want["pooled"], rtol=0, atol=1e-6)


def test_preprocessing_is_the_checkpoints_clip_processor(checkpoints, photos):
    from transformers import CLIPImageProcessor

    encoder = vitport.load(str(checkpoints["projection"]))
    images = [p.image for p in photos]
    want = CLIPImageProcessor.from_pretrained(checkpoints["projection"])(
        images=images, return_tensors="pt"
    )["pixel_values"]
    assert torch.equal(encoder.preprocess(images), want)
    assert encoder.preprocess.describe()["processor"] == "CLIPImageProcessor"


def test_layout_blocks_and_parts(checkpoints):
    encoder = vitport.load(str(checkpoints["projection"]))
    assert (encoder.layout.num_cls, encoder.layout.num_registers) == (1, 0)
    assert len(encoder.blocks) == 2
    assert set(encoder.block_parts(0)) == {"self_attn", "layer_norm1", "mlp", "layer_norm2"}
    arch = encoder.arch
    assert (arch.hidden_size, arch.depth, arch.mlp_hidden, arch.gated_mlp) == (32, 2, 64, False)
    assert arch.activation == "quick_gelu"
    # tokens leave the last block un-normalised: post_layernorm belongs to the pooler
    assert encoder.final_norm is None


def test_the_full_clip_model_loads_its_vision_tower_only(checkpoints):
    encoder = vitport.load(str(checkpoints["full"]))
    names = {name for name, _ in encoder.module.named_parameters()}
    assert not any(name.startswith(("text_model", "text_projection")) for name in names)
    assert any(name.startswith("visual_projection") for name in names)


def test_flops_equal_torchs_flop_counter_on_the_same_forward(checkpoints):
    for kind in ("projection", "plain"):
        encoder = vitport.load(str(checkpoints[kind]))
        counted = flops_per_image(encoder.arch, encoder.image_size, encoder.layout.num_prefix)
        assert counted.total == profiled_flops(encoder)
        assert counted.head == (2 * 32 * 16 if kind == "projection" else 0)


def test_a_classification_checkpoint_is_refused_in_one_line(tmp_path):
    import transformers

    config = transformers.CLIPConfig(vision_config=VISION, text_config=TEXT, num_labels=3)
    transformers.CLIPForImageClassification(config).save_pretrained(tmp_path)
    processor().save_pretrained(tmp_path)
    with pytest.raises(VitportError) as info:
        vitport.load(str(tmp_path))
    assert "\n" not in str(info.value) and "CLIPForImageClassification" in str(info.value)


def test_erf_gelu_keeps_the_quick_gelu_clip_was_trained_with(checkpoints, photos):
    encoder = vitport.load(str(checkpoints["projection"]))
    before = encoder.encode(encoder.preprocess([p.image for p in photos[:2]]))
    with pytest.raises(VitportError, match="trained with quick_gelu, not exact GELU"):
        apply_fixes(encoder, ["erf-gelu"])
    after = encoder.encode(encoder.preprocess([p.image for p in photos[:2]]))
    assert torch.equal(after.pooled, before.pooled)


@pytest.mark.slow  # every command end to end, report included (~40 s); CI runs it
def test_every_command_runs(checkpoints, tmp_path, monkeypatch, capsys):
    check_every_command(
        checkpoints["projection"],
        image_files(tmp_path / "images"),
        tmp_path,
        monkeypatch,
        capsys,
        fault="layernorm-bf16@1",
        culprit="vision_model.encoder.layers.1.layer_norm1",
        cure="layernorm-fp32",
    )
