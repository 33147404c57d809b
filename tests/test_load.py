"""Every family through the one door: shapes, layout, pooled, determinism, dtype, preprocessing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file, save_file

import vitport
from vitport.errors import (
    HubUnreachableError,
    SpecError,
    UnsupportedModelError,
    VitportError,
    WeightsError,
)
from vitport.families import registry
from vitport.infer import infer


@pytest.mark.parametrize("name", list(TINY))
def test_family_loads_with_config_layout(name, tiny_dir, photos):
    tiny = TINY[name]
    encoder = vitport.load(str(tiny_dir(name)))
    feats = infer(encoder, photos, batch_size=2).features
    n, hidden = len(photos), encoder.arch.hidden_size
    assert feats.grid == tiny.grid
    assert feats.patches.shape == (n, tiny.grid[0] * tiny.grid[1], hidden)
    assert (feats.cls is not None) == bool(tiny.num_cls)
    if tiny.num_cls:
        assert feats.cls.shape == (n, hidden)
    if tiny.num_registers:
        assert feats.registers.shape == (n, tiny.num_registers, hidden)
    else:
        assert feats.registers is None
    assert feats.pooled.shape[0] == n
    assert (feats.logits is not None) == tiny.has_logits
    assert len(encoder.blocks) == 2
    parts = encoder.block_parts(0)
    assert sum("att" in k for k in parts) == 1
    assert any(k in parts for k in ("mlp", "ffn"))
    assert feats.names == [p.name for p in photos]
    assert feats.meta["weights_sha256"] == encoder.weights_sha256


@pytest.mark.parametrize("name", list(TINY))
def test_runs_are_deterministic(name, tiny_dir, photos):
    encoder = vitport.load(str(tiny_dir(name)))
    first = infer(encoder, photos[:2]).features
    second = infer(encoder, photos[:2]).features
    for group, tensor in first.groups().items():
        assert torch.equal(tensor, second.groups()[group]), group


def test_pooled_is_the_family_pooler(tiny_dir, photos):
    """DINOv2 pools the normalised CLS token; AIMv2 without a head averages its patches."""
    dino = infer(vitport.load(str(tiny_dir("dinov2"))), photos[:2]).features
    assert torch.allclose(dino.pooled, dino.cls)
    aim = infer(vitport.load(str(tiny_dir("aimv2"))), photos[:2]).features
    assert aim.cls is None


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_dtype_moves_weights_and_stays_close(dtype, tiny_dir, photos):
    path = str(tiny_dir("dinov2"))
    ref = infer(vitport.load(path), photos[:2]).features
    low = vitport.load(path, dtype=dtype)
    assert {p.dtype for p in low.module.parameters()} == {vitport.device.parse_dtype(dtype)}
    out = infer(low, photos[:2]).features
    assert out.meta["dtype"] == dtype
    assert not torch.equal(out.cls, ref.cls)
    cos = torch.nn.functional.cosine_similarity(out.cls, ref.cls, dim=-1)
    assert cos.min() > 0.99


def test_preprocessing_follows_config_and_image_size(tiny_dir, photos):
    path = str(tiny_dir("dinov2"))
    encoder = vitport.load(path)
    pixels = encoder.preprocess([photos[0].image])
    assert pixels.shape == (1, 3, 28, 28)
    # the processor normalises with the config's mean/std: a grey 50% image maps near (0.5-m)/s
    assert encoder.preprocess.describe()["mean"] == pytest.approx([0.485, 0.456, 0.406])
    bigger = vitport.load(path, image_size=42)
    feats = infer(bigger, photos[:1]).features
    assert feats.grid == (3, 3)
    assert bigger.preprocess([photos[0].image]).shape == (1, 3, 42, 42)


def test_timm_image_size_resamples_position_embeddings(tiny_dir, photos):
    encoder = vitport.load(str(tiny_dir("timm_vit_reg4")), image_size=42)
    assert infer(encoder, photos[:1]).features.grid == (3, 3)


def test_image_size_must_be_a_patch_multiple(tiny_dir):
    with pytest.raises(VitportError, match="multiple of the patch size 14"):
        vitport.load(str(tiny_dir("dinov2")), image_size=30)


def test_fixed_position_embeddings_refuse_other_sizes(tiny_dir):
    with pytest.raises(VitportError, match="fixed position embeddings"):
        vitport.load(str(tiny_dir("aimv2")), image_size=42)


def test_untrained_head_is_said_and_dropped(tiny_dir, tmp_path, photos):
    import shutil

    path = tmp_path / "vit-in21k-like"
    shutil.copytree(tiny_dir("vit"), path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["ViTForImageClassification"]
    (path / "config.json").write_text(json.dumps(config))
    encoder = vitport.load(str(path))
    assert any("no trained weights" in note for note in encoder.notes)
    assert infer(encoder, photos[:1]).features.logits is None


def test_features_round_trip(tiny_dir, photos, tmp_path):
    feats = infer(vitport.load(str(tiny_dir("vit_classifier"))), photos[:2]).features
    path = feats.save(tmp_path / "golden.safetensors")
    back = vitport.Features.load(path)
    assert back.shapes() == feats.shapes()
    assert back.names == feats.names and back.grid == feats.grid
    assert back.meta == feats.meta
    for group, tensor in feats.groups().items():
        assert torch.equal(back.groups()[group], tensor)


def test_weights_hash_tells_models_apart(tiny_dir):
    a = vitport.load(str(tiny_dir("dinov2"))).weights_sha256
    b = vitport.load(str(tiny_dir("dinov2_with_registers"))).weights_sha256
    assert len(a) == 64 and a != b


# --- failure modes: each one clear line -------------------------------------------------------


def test_unknown_spec():
    with pytest.raises(SpecError, match="cannot understand model spec"):
        vitport.load("not a spec!")


def test_hub_unreachable_suggests_local_or_modelscope(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="local directory, or use ms:"):
        vitport.load("facebook/dinov2-small")


def test_weights_that_do_not_fit_name_the_tensor(tiny_dir, tmp_path):
    import shutil

    path = tmp_path / "bad"
    shutil.copytree(tiny_dir("dinov2"), path)
    state = load_file(path / "model.safetensors")
    state["encoder.layer.1.mlp.fc1.weight"] = torch.zeros(10, 32)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="'encoder.layer.1.mlp.fc1.weight' has shape"):
        vitport.load(str(path))


def test_incomplete_weights_name_the_first_missing_tensor(tiny_dir, tmp_path):
    import shutil

    path = tmp_path / "partial"
    shutil.copytree(tiny_dir("dinov2"), path)
    state = load_file(path / "model.safetensors")
    del state["encoder.layer.0.norm1.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="first 'encoder.layer.0.norm1.weight'"):
        vitport.load(str(path))


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="has no config.json"):
        vitport.load(str(tmp_path))


def test_directory_without_weights(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dir("dinov2") / "config.json").read_text())
    with pytest.raises(WeightsError, match="no weights in"):
        vitport.load(str(tmp_path))


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedModelError, match="supported: aimv2"):
        vitport.load(str(tmp_path))


def test_timm_unknown_name():
    with pytest.raises(SpecError, match="timm has no model 'vit_nonexistent_x'"):
        vitport.load("timm:vit_nonexistent_x")


def test_timm_offline_without_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="pass weights=FILE"):
        vitport.load("timm:vit_small_patch14_reg4_dinov2.lvd142m")


def test_timm_weights_file(tiny_dir, tmp_path, photos):
    """timm:NAME --weights FILE, with a checkpoint for another size refused by tensor name."""
    import timm

    args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28}
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, **args)
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), path)
    with pytest.raises(
        WeightsError,
        match=r"'cls_token' has shape \[1, 1, 32\] in the file, the model expects \[1, 1, 384\]",
    ):
        vitport.load("timm:vit_small_patch14_reg4_dinov2", weights=path)
    pth = tmp_path / "w.pth"
    torch.save({"model": model.state_dict()}, pth)
    with pytest.raises(WeightsError, match="weights do not fit"):
        vitport.load("timm:vit_small_patch14_reg4_dinov2", weights=pth)


def test_modelscope_needs_its_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(SpecError, match=r"pip install 'vitport\[modelscope\]'"):
        vitport.load("ms:facebook/dinov2-small")


def test_modelscope_snapshot_loads_as_local_dir(monkeypatch, tiny_dir, photos):
    import sys
    import types

    fake = types.ModuleType("modelscope")
    fake.snapshot_download = lambda repo_id: str(tiny_dir("dinov2"))
    monkeypatch.setitem(sys.modules, "modelscope", fake)
    encoder = vitport.load("ms:facebook/dinov2-small")
    assert encoder.layout.num_cls == 1 and encoder.spec == "ms:facebook/dinov2-small"


def test_wrong_device_is_one_line():
    with pytest.raises(VitportError, match="not available"):
        vitport.load("demo:dinov2-small", device="cuda")


def test_timm_pretrained_comes_through_the_hub_snapshot(monkeypatch, tiny_dir):
    """timm:NAME downloads its hub repository like any other, then loads it as a timm dir."""
    from vitport.families import sources

    asked = []
    monkeypatch.setattr(
        sources, "hub_snapshot", lambda repo: asked.append(repo) or tiny_dir("timm_vit_reg4")
    )
    encoder = vitport.load("timm:vit_small_patch14_reg4_dinov2.lvd142m")
    assert asked == ["timm/vit_small_patch14_reg4_dinov2.lvd142m"]
    assert encoder.layout.num_registers == 4 and encoder.family == "timm"


@pytest.mark.parametrize("name", ["dinov2", "dinov2_with_registers", "vit"])
def test_a_transformers_checkpoint_resampled_says_from_which_grid(tiny_dir, name):
    native = vitport.load(str(tiny_dir(name)))
    assert native.resampled_from is None and not any("resampled" in n for n in native.notes)
    side = native.image_size[0]
    bigger = vitport.load(str(tiny_dir(name)), image_size=2 * side)
    grid = side // native.layout.patch_size
    assert bigger.resampled_from == (grid, grid)
    assert f"from the checkpoint's {grid}x{grid} grid ({side} px)" in bigger.notes[-1]


def test_rope_models_have_no_grid_to_resample(tiny_dir):
    encoder = vitport.load(str(tiny_dir("dinov3_vit")), image_size=64)
    assert encoder.resampled_from is None


@pytest.mark.parametrize("family", registry().names())
def test_every_family_brings_tiny_models_that_load_as_it(family, tiny_dir):
    """A family that loads checkpoints brings a tiny model, and it loads through that family."""
    record = registry().get(family)
    if not record.loader:  # a source of other families' checkpoints (the demo)
        assert not record.tiny and not record.model_types
        return
    assert record.tiny, f"{family} brings no tiny model for the tests"
    for tiny in record.tiny:
        encoder = vitport.load(str(tiny_dir(tiny.name)))
        if record.loader == "timm":
            assert encoder.family == "timm"
        else:
            assert encoder.family.removeprefix("transformers/") in record.model_types
