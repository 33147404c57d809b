"""The SigLIP vision tower (`SiglipVisionModel`, and the vision half of a full `SiglipModel`): no
class token, tanh GELU, the attention-pooling head; the same numbers as transformers' own forward,
and every command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from every_command import check_every_command, image_files, profiled_flops

import vitport
from vitport.bench.flops import flops_per_image
from vitport.errors import VitportError
from vitport.fixes import apply_fixes

# 32 px with 14 px patches: a 2x2 grid that leaves a margin, as so400m-patch14-384 (27x27) does
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 14,
}
TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 16,
}


def processor():
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": 32, "width": 32}, resample=3)


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """The registered tiny SigLIP vision tower, and a full vision+text SiglipModel."""
    import transformers

    made = {"vision": tiny_dir("siglip")}
    torch.manual_seed(2)
    full = tmp_path_factory.mktemp("siglip-full")
    config = transformers.SiglipConfig(vision_config=VISION, text_config=TEXT)
    transformers.SiglipModel(config).save_pretrained(full)
    processor().save_pretrained(full)
    made["full"] = full
    return made


def transformers_forward(kind: str, path: Path, pixels: torch.Tensor, **kwargs) -> dict:
    import transformers

    with torch.no_grad():
        if kind == "full":
            model = transformers.SiglipModel.from_pretrained(path).eval()
            out = model.vision_model(pixel_values=pixels, **kwargs)
        else:
            model = transformers.SiglipVisionModel.from_pretrained(path).eval()
            out = model(pixel_values=pixels, **kwargs)
    return {"tokens": out.last_hidden_state, "pooled": out.pooler_output}


@pytest.mark.parametrize("kind", ["vision", "full"])
def test_outputs_equal_transformers_forward(kind, checkpoints, photos):
    encoder = vitport.load(str(checkpoints[kind]))
    pixels = encoder.preprocess([p.image for p in photos])
    feats = encoder.encode(pixels)
    want = transformers_forward(kind, checkpoints[kind], pixels)
    assert feats.cls is None and feats.registers is None and feats.logits is None
    torch.testing.assert_close(feats.patches, want["tokens"], rtol=0, atol=1e-6)
    torch.testing.assert_close(feats.pooled, want["pooled"], rtol=0, atol=1e-6)
    assert feats.grid == (2, 2)


def test_the_pooled_output_is_the_attention_pooling_head(checkpoints, photos):
    encoder = vitport.load(str(checkpoints["vision"]))
    feats = encoder.encode(encoder.preprocess([p.image for p in photos[:2]]))
    head = encoder.module.head
    assert type(head).__name__ == "SiglipMultiheadAttentionPoolingHead"
    with torch.inference_mode():
        pooled = head(feats.patches)
    torch.testing.assert_close(feats.pooled, pooled, rtol=0, atol=1e-6)
    assert not torch.allclose(feats.pooled, feats.patches.mean(1), atol=1e-3)


def test_a_larger_input_interpolates_positions_as_transformers_does(checkpoints, photos):
    encoder = vitport.load(str(checkpoints["vision"]), image_size=56)
    pixels = encoder.preprocess([p.image for p in photos[:2]])
    feats = encoder.encode(pixels)
    want = transformers_forward(
        "vision", checkpoints["vision"], pixels, interpolate_pos_encoding=True
    )
    assert feats.grid == (4, 4) and encoder.resampled_from == (2, 2)
    torch.testing.assert_close(feats.patches, want["tokens"], rtol=0, atol=1e-6)
    torch.testing.assert_close(feats.pooled, want["pooled"], rtol=0, atol=1e-6)


def test_an_asked_size_off_the_patch_grid_is_refused_in_one_line(checkpoints):
    with pytest.raises(VitportError) as info:
        vitport.load(str(checkpoints["vision"]), image_size=50)
    assert "\n" not in str(info.value) and "42 or 56" in str(info.value)


def test_preprocessing_is_the_checkpoints_siglip_processor(checkpoints, photos):
    from transformers import SiglipImageProcessor

    encoder = vitport.load(str(checkpoints["vision"]))
    images = [p.image for p in photos]
    want = SiglipImageProcessor.from_pretrained(checkpoints["vision"])(
        images=images, return_tensors="pt"
    )["pixel_values"]
    assert torch.equal(encoder.preprocess(images), want)
    assert encoder.image_size == (32, 32)


def test_layout_blocks_and_parts(checkpoints):
    encoder = vitport.load(str(checkpoints["vision"]))
    assert (encoder.layout.num_cls, encoder.layout.num_registers) == (0, 0)
    assert len(encoder.blocks) == 2
    assert set(encoder.block_parts(0)) == {"self_attn", "layer_norm1", "mlp", "layer_norm2"}
    assert encoder.arch.activation == "gelu_pytorch_tanh"
    assert encoder.final_norm is encoder.module.post_layernorm


def test_the_full_siglip_model_loads_its_vision_tower_only(checkpoints):
    encoder = vitport.load(str(checkpoints["full"]))
    names = [name for name, _ in encoder.module.named_parameters()]
    assert not any("text" in name for name in names)
    assert any(name.startswith("head.") for name in names)


def test_a_classification_checkpoint_is_refused_in_one_line(tmp_path):
    import transformers

    config = transformers.SiglipConfig(vision_config=VISION, text_config=TEXT, num_labels=3)
    transformers.SiglipForImageClassification(config).save_pretrained(tmp_path)
    processor().save_pretrained(tmp_path)
    with pytest.raises(VitportError) as info:
        vitport.load(str(tmp_path))
    assert "\n" not in str(info.value) and "SiglipForImageClassification" in str(info.value)


def test_flops_equal_torchs_flop_counter_on_the_same_forward(checkpoints):
    for size in (None, 56):
        encoder = vitport.load(str(checkpoints["vision"]), image_size=size)
        counted = flops_per_image(encoder.arch, encoder.image_size, encoder.layout.num_prefix)
        assert counted.head > 0
        assert counted.total == profiled_flops(encoder)


def test_erf_gelu_keeps_the_tanh_gelu_siglip_was_trained_with(checkpoints, photos):
    encoder = vitport.load(str(checkpoints["vision"]))
    before = encoder.encode(encoder.preprocess([p.image for p in photos[:2]]))
    with pytest.raises(VitportError, match="trained with gelu_pytorch_tanh, not exact GELU"):
        apply_fixes(encoder, ["erf-gelu"])
    after = encoder.encode(encoder.preprocess([p.image for p in photos[:2]]))
    assert torch.equal(after.pooled, before.pooled)


@pytest.mark.slow  # every command end to end, report included (~40 s); CI runs it
def test_every_command_runs(checkpoints, tmp_path, monkeypatch, capsys):
    check_every_command(
        checkpoints["vision"],
        image_files(tmp_path / "images"),
        tmp_path,
        monkeypatch,
        capsys,
        fault="layernorm-bf16@0",
        culprit="encoder.layers.0.layer_norm1",
        cure="layernorm-fp32",
    )
