"""vitport convert: every pair round-trips on tiny random models, broken sources are refused by
name, and a conversion that changes the function is never written."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file, save_file

from vitport.convert import VerificationFailed, convert
from vitport.convert.engine import ConversionError, Rule
from vitport.convert.layouts import detect_layout, file_sha256
from vitport.convert.tables import TABLES
from vitport.families.dinov2 import HUB_HF as HUB_HF_DINOV2


def randomize(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Weights large enough that attention is sharp: a swapped q/k or a transposed weight must
    change the output, as it does in a trained model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.6 / p.shape[-1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return module


def timm_dir(path: Path, name: str, **args) -> Path:
    import timm
    from timm.models._hub import save_for_hf

    save_for_hf(
        randomize(timm.create_model(name, **args)), path, model_args=args, safe_serialization=True
    )
    return path


def hf_dir(path: Path, model: str, config: str, **kwargs) -> Path:
    import transformers

    cfg = getattr(transformers, config)(**kwargs)
    randomize(getattr(transformers, model)(cfg)).save_pretrained(path)
    transformers.BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 28, "width": 28},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)
    return path


def hub_state(registers: bool) -> dict[str, torch.Tensor]:
    """A DINOv2 torch-hub checkpoint: timm's DINOv2 layout plus mask_token (and registers)."""
    import timm

    model = randomize(
        timm.create_model(
            "vit_small_patch14_dinov2",
            embed_dim=128,
            depth=2,
            num_heads=2,
            img_size=28,
            init_values=1.0,
        )
    )
    state = dict(model.state_dict())
    state["mask_token"] = torch.zeros(1, 128)
    if registers:
        state["register_tokens"] = torch.randn(
            1, 4, 128, generator=torch.Generator().manual_seed(3)
        )
    return state


def test_giant_swiglu_hub_checkpoint(tmp_path):
    """ViT-g's fused SwiGLU (w12, w3) becomes transformers' weights_in / weights_out."""
    import timm

    model = randomize(
        timm.create_model(
            "vit_giant_patch14_dinov2",
            embed_dim=128,
            depth=2,
            num_heads=2,
            img_size=28,
            mlp_ratio=5.375,
        )
    )
    state = {
        k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v
        for k, v in model.state_dict().items()
    }
    state["mask_token"] = torch.zeros(1, 128)
    torch.save(state, tmp_path / "dinov2_vitg14.pth")
    result = convert(str(tmp_path / "dinov2_vitg14.pth"), "hf", tmp_path / "hf")
    assert result.arch["gated"] and result.passed
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["use_swiglu_ffn"] is True
    loads_without_vitport(tmp_path / "hf", "hf")


def test_arch_names_the_head_count(sources, tmp_path):
    result = convert(str(sources["hub"]), "hf", tmp_path / "hf", arch="vit_large_patch14_dinov2")
    assert result.arch["heads"] == 16 and result.passed
    with pytest.raises(Exception, match="^arch=no_such_vit: timm has no such") as caught:
        convert(str(sources["hub"]), "hf", tmp_path / "x", arch="no_such_vit")
    from vitport.cli.flags import cli_message

    assert cli_message(caught.value).startswith("--arch no_such_vit: timm has no such")


APPLE_NAMES = (
    ("patch_embed.proj", "preprocessor.patchifier.proj"),
    ("patch_embed.norm", "preprocessor.patchifier.norm"),
    ("pos_embed", "preprocessor.pos_embed"),
    ("norm1", "norm_1"),
    ("norm2", "norm_2"),
    ("fc1_g", "fc1"),
    ("fc1_x", "fc3"),
)


def apple_dir(path: Path) -> Path:
    """Apple's original AIMv2 release: preprocessor.* / trunk.* keys and an `aimv2` config."""
    import timm

    model = randomize(
        timm.create_model(
            "aimv2_large_patch14_224",
            embed_dim=32,
            depth=2,
            num_heads=2,
            img_size=28,
            mlp_ratio=2.75,
        )
    )
    state = {}
    for key, value in model.state_dict().items():
        for old, new in APPLE_NAMES:
            key = key.replace(old, new)
        if key.startswith("blocks."):
            key = "trunk." + key
        key = (
            key.replace("norm.weight", "trunk.post_trunk_norm.weight")
            if key == "norm.weight"
            else key
        )
        state[key] = value.contiguous()
    path.mkdir(parents=True)
    save_file(state, str(path / "model.safetensors"))
    config = {
        "architectures": ["AIMv2Model"],
        "model_type": "aimv2",
        "hidden_size": 32,
        "intermediate_size": 88,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 14,
        "rms_norm_eps": 1e-5,
        "qkv_bias": False,
        "use_bias": False,
        "num_channels": 3,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    made = {
        "timm-dinov2-reg": timm_dir(
            root / "timm-reg",
            "vit_small_patch14_reg4_dinov2",
            embed_dim=32,
            depth=2,
            num_heads=2,
            img_size=28,
            init_values=1.0,
        ),
        "timm-vit-head": timm_dir(
            root / "timm-vit",
            "vit_base_patch16_224",
            embed_dim=32,
            depth=2,
            num_heads=2,
            img_size=32,
            patch_size=16,
            num_classes=5,
        ),
        "hf-dinov2": hf_dir(
            root / "hf-dinov2",
            "Dinov2Model",
            "Dinov2Config",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        "hf-vit-pooler": hf_dir(
            root / "hf-vit",
            "ViTModel",
            "ViTConfig",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=28,
            patch_size=14,
        ),
        "apple": apple_dir(root / "apple"),
    }
    for registers in (False, True):
        path = root / f"dinov2_hub{'_reg' if registers else ''}.pth"
        torch.save(hub_state(registers), path)
        made["hub-reg" if registers else "hub"] = path
    return made


def on_disk(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def loads_without_vitport(directory: Path, layout: str) -> None:
    """transformers or timm alone loads the result, with no tensor missing or left over."""
    if layout == "timm":
        import timm

        timm.create_model(f"local-dir:{directory}", pretrained=True)  # strict load
        return
    import transformers

    config = json.loads((directory / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    _, info = cls.from_pretrained(str(directory), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    transformers.AutoImageProcessor.from_pretrained(str(directory))


@pytest.mark.parametrize(
    ("name", "via"),
    [
        ("timm-dinov2-reg", "hf"),
        ("timm-vit-head", "hf"),
        ("hf-dinov2", "timm"),
        ("hf-vit-pooler", "timm"),
    ],
)
def test_round_trip_restores_every_tensor(sources, tmp_path, name, via):
    there = convert(str(sources[name]), via, tmp_path / "there")
    assert there.passed and there.checks[0].judgement.worst_rel_error < 1e-5
    loads_without_vitport(tmp_path / "there", via)
    back_layout = "timm" if via == "hf" else "hf"
    back = convert(str(tmp_path / "there"), back_layout, tmp_path / "back")
    assert back.passed
    loads_without_vitport(tmp_path / "back", back_layout)
    original = on_disk(sources[name])
    restored = on_disk(tmp_path / "back")
    dropped = set(there.dropped) | set(back.filled) | set(there.filled) | set(back.dropped)
    for key, tensor in original.items():
        if key in dropped:
            continue
        key = key if key in restored else f"vit.{key}"  # ViTModel comes back with a head class
        assert torch.equal(restored[key], tensor), key


def test_timm_registers_fold_class_position(sources, tmp_path):
    """timm folds the class position into the class token; transformers gets it back as zero."""
    convert(str(sources["timm-dinov2-reg"]), "hf", tmp_path / "hf")
    timm_state, hf_state = on_disk(sources["timm-dinov2-reg"]), on_disk(tmp_path / "hf")
    assert timm_state["pos_embed"].shape[1] == 4  # patches only
    assert hf_state["embeddings.position_embeddings"].shape[1] == 5  # class + patches
    assert torch.equal(hf_state["embeddings.position_embeddings"][:, 0], torch.zeros(1, 32))
    assert torch.equal(hf_state["embeddings.cls_token"], timm_state["cls_token"])


def test_vit_pooler_is_dropped_with_its_reason_and_not_compared(sources, tmp_path):
    result = convert(str(sources["hf-vit-pooler"]), "timm", tmp_path / "timm")
    assert set(result.dropped) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert "pooled" in result.checks[0].skipped
    assert "pooled" not in result.checks[0].judgement.groups


@pytest.mark.parametrize("name", ["hub", "hub-reg", "apple"])
def test_foreign_release_to_transformers(sources, tmp_path, name):
    """DINOv2 torch-hub and Apple AIMv2 checkpoints become plain transformers directories that
    compute what timm, reading the original layout itself, computes."""
    out = tmp_path / "hf"
    result = convert(str(sources[name]), "hf", out)
    assert (
        result.source_layout
        == {"hub": "dinov2-hub", "hub-reg": "dinov2-hub", "apple": "aimv2-apple"}[name]
    )
    assert result.passed and result.checks[0].judgement.worst_rel_error < 1e-5
    loads_without_vitport(out, "hf")
    record = json.loads((out / "conversion.json").read_text())
    weights = sources[name] if sources[name].is_file() else sources[name] / "model.safetensors"
    assert record["source"]["sha256"] == file_sha256(weights)
    assert record["mapping"] == {"table": result.table, "version": 1}
    assert record["verification"]["passed"] is True
    assert record["verification"]["checks"][0]["groups"]  # the numbers, not only the verdict
    config = json.loads((out / "config.json").read_text())
    expected = {
        "hub": "Dinov2Model",
        "hub-reg": "Dinov2WithRegistersModel",
        "apple": "Aimv2VisionModel",
    }[name]
    assert config["architectures"] == [expected]
    if name == "hub":
        assert config["num_attention_heads"] == 2  # 128 wide / DINOv2's head width of 64


def test_apple_split_and_swiglu_mapping(sources, tmp_path):
    convert(str(sources["apple"]), "hf", tmp_path / "hf")
    apple, hf = on_disk(sources["apple"]), on_disk(tmp_path / "hf")
    qkv = apple["trunk.blocks.1.attn.qkv.weight"]
    q, k, v = qkv.chunk(3)
    assert torch.equal(hf["encoder.layers.1.attention.k_proj.weight"], k)
    assert torch.equal(
        hf["encoder.layers.1.ffn.gate_proj.weight"], apple["trunk.blocks.1.mlp.fc1.weight"]
    )
    assert torch.equal(
        hf["encoder.layers.1.ffn.up_proj.weight"], apple["trunk.blocks.1.mlp.fc3.weight"]
    )
    assert hf["embeddings.position_embedding.weight"].shape == (4, 32)


def test_layout_detected_from_keys(sources):
    assert detect_layout(torch.load(sources["hub"], weights_only=True)) == "dinov2-hub"
    assert detect_layout(on_disk(sources["apple"])) == "aimv2-apple"
    assert detect_layout(on_disk(sources["timm-vit-head"])) == "timm"
    assert detect_layout(["vit.embeddings.patch_embeddings.projection.weight"]) == "hf"


def test_every_table_has_its_inverse():
    for (source, target, family), table in TABLES.items():
        if source == "hf":
            forward = TABLES[(target, source, family)]
            assert tuple(r.inverse() for r in forward.rules) == table.rules


# --- ONNX ----------------------------------------------------------------------------------------


def test_onnx_dynamic_batch_runs_at_another_batch_size(sources, tmp_path):
    import onnxruntime as ort

    import vitport

    result = convert(str(sources["timm-dinov2-reg"]), "onnx", tmp_path / "onnx")
    assert [c.batch_size for c in result.checks] == [1, 5] and result.passed
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    assert [o.name for o in session.get_outputs()] == ["cls", "registers", "patches", "pooled"]
    encoder = vitport.load(str(sources["timm-dinov2-reg"]))
    pixels = torch.randn(3, 3, 28, 28)  # a batch size it was never exported or verified at
    cls, registers, patches, pooled = session.run(None, {"pixel_values": pixels.numpy()})
    feats = encoder.encode(pixels)
    assert cls.shape == (3, 32) and registers.shape == (3, 4, 32)
    torch.testing.assert_close(torch.from_numpy(patches), feats.patches, atol=1e-4, rtol=1e-4)


def test_onnx_static_fixes_batch_and_size(sources, tmp_path):
    import onnx

    result = convert(
        str(sources["hf-dinov2"]), "onnx", tmp_path / "onnx", static=True, batch_size=2
    )
    assert [c.batch_size for c in result.checks] == [2] and result.passed
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 28, 28]
    assert (tmp_path / "onnx" / "preprocessor_config.json").is_file()


def test_onnx_of_registers_model_with_antialiased_positions(sources, tmp_path):
    """transformers' DINOv2-with-registers interpolates positions with antialiasing while
    tracing; vitport exports that as ONNX Resize (opset 18) and it verifies."""
    hf = convert(str(sources["timm-dinov2-reg"]), "hf", tmp_path / "hf")
    assert hf.passed
    result = convert(str(tmp_path / "hf"), "onnx", tmp_path / "onnx")
    assert result.passed


# --- broken sources ------------------------------------------------------------------------------


def broken_hub(tmp_path: Path, edit) -> str:
    state = hub_state(registers=False)
    edit(state)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda s: s.pop("blocks.1.norm1.weight"), "blocks.1.norm1.weight"),
        (
            lambda s: s.update({"blocks.0.attn.extra.weight": torch.zeros(2)}),
            "blocks.0.attn.extra.weight",
        ),
        (
            lambda s: s.update({"blocks.1.mlp.fc1.weight": torch.zeros(500, 128)}),
            "blocks.1.mlp.fc1.weight",
        ),
        (
            lambda s: s.update({"blocks.1.attn.qkv.weight": torch.zeros(380, 128)}),
            "blocks.1.attn.qkv.weight",
        ),
    ],
    ids=["missing", "unknown", "wrong-shape", "qkv-not-splittable"],
)
def test_broken_source_refused_naming_the_tensor(tmp_path, edit, named):
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=named.replace(".", r"\.")) as info:
        convert(broken_hub(tmp_path, edit), "hf", out)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))  # the staging directory is gone


def _broken_table(change):
    rules = tuple(change(r) for r in HUB_HF_DINOV2.rules)
    return replace(HUB_HF_DINOV2, rules=rules)


def _transpose_proj(rule: Rule) -> Rule:
    if rule.sources == ("blocks.{i}.attn.proj",):
        return replace(rule, op="transpose")
    return rule


def _swap_qk(rule: Rule) -> Rule:
    if rule.op == "split":
        q, k, v = rule.targets
        return replace(rule, targets=(k, q, v))
    return rule


@pytest.mark.parametrize(
    ("change", "named"),
    [(_transpose_proj, "blocks.0.attn.proj.weight"), (_swap_qk, "blocks.0.attn.qkv.weight")],
    ids=["transposed-square-weight", "q-k-swapped"],
)
def test_shape_preserving_mistake_caught_only_by_the_output(sources, tmp_path, change, named):
    """A transposed square weight or q/k swapped in the fused qkv pass every shape check; the
    comparison with the source function refuses them, names the tensors, writes nothing."""
    out = tmp_path / "out"
    with pytest.raises(VerificationFailed) as info:
        convert(str(sources["hub"]), "hf", out, mapping_override=_broken_table(change))
    message = str(info.value)
    assert info.value.exit_code == 1 and named in message and "block 0 attention" in message
    assert not info.value.result.passed
    assert not out.exists()


def test_existing_output_refused_without_overwrite(sources, tmp_path):
    out = tmp_path / "out"
    first = convert(str(sources["apple"]), "hf", out)
    with pytest.raises(Exception, match="already exists"):
        convert(str(sources["apple"]), "hf", out)
    again = convert(str(sources["apple"]), "hf", out, overwrite=True)
    assert again.passed and (out / "model.safetensors").is_file() and first.table == again.table


def test_converted_files_have_the_users_umask_modes(sources, tmp_path):
    """Every file, model.safetensors too, as the user's umask makes it (not a temp file's 0600)."""
    from vitport.outputs import umask

    out = tmp_path / "out"
    convert(str(sources["apple"]), "hf", out)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~umask()}, modes
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask()


def test_same_layout_and_unknown_layout_refused(sources, tmp_path):
    from vitport.errors import SpecError

    with pytest.raises(SpecError, match="already in the hf layout"):
        convert(str(sources["hf-dinov2"]), "hf", tmp_path / "a")
    with pytest.raises(SpecError, match="^from_layout=caffe: unknown layout") as caught:
        convert(str(sources["hub"]), "hf", tmp_path / "b", from_layout="caffe")
    from vitport.cli.flags import cli_message

    assert cli_message(caught.value).startswith("--from caffe: unknown layout; use one of ")


# --- the command line ----------------------------------------------------------------------------


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from test_cli import run

    return run(monkeypatch, capsys, *args)


def test_cli_prints_the_proof_and_writes(sources, tmp_path, capsys, monkeypatch):
    out = tmp_path / "hf"
    record = tmp_path / "record.json"
    code, stdout, _ = run_cli(
        monkeypatch,
        capsys,
        "convert",
        str(sources["hub-reg"]),
        "--to",
        "hf",
        "--out",
        str(out),
        "--json",
        str(record),
    )
    assert code == 0
    assert "same function" in stdout and "registers" in stdout and "pass" in stdout
    assert json.loads(record.read_text())["verification"]["passed"] is True


def test_cli_broken_source_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    source = broken_hub(tmp_path, lambda s: s.pop("blocks.0.attn.proj.weight"))
    out = str(tmp_path / "o")
    code, _, err = run_cli(monkeypatch, capsys, "convert", source, "--to", "hf", "--out", out)
    assert code == 2
    assert "blocks.0.attn.proj.weight" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_real_trained_model_to_timm_is_exact(tmp_path):
    """The demo's trained DINOv2 ViT-S/14 into timm, verified at 518 px against transformers."""
    import timm

    result = convert("demo:dinov2-small", "timm", tmp_path / "timm")
    assert result.passed and result.image_size == 518
    groups = result.checks[0].judgement.groups
    assert groups["cls"].worst["rel_error"] < 1e-5
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    assert model.num_prefix_tokens == 1 and model.embed_dim == 384


@pytest.mark.parametrize("name", ["dinov3_vit", "vit_classifier", "aimv2"])
def test_onnx_of_every_family(tiny_dir, tmp_path, name):
    """DINOv3's rotary positions, a classifier's logits, AIMv2's RMSNorm: all export and verify."""
    result = convert(str(tiny_dir(name)), "onnx", tmp_path / "onnx")
    assert result.passed and [c.batch_size for c in result.checks] == [1, 5]
    assert ("logits" in result.arch["outputs"]) == (name == "vit_classifier")


def test_onnx_straight_from_a_foreign_checkpoint(sources, tmp_path):
    """Apple's AIMv2 release to ONNX in one step: timm reads it, RMSNorm becomes ONNX ops."""
    result = convert(str(sources["apple"]), "onnx", tmp_path / "onnx")
    assert result.passed and result.source_layout == "aimv2-apple"


def test_cli_changed_function_exit_1_with_the_table_and_record(
    sources, tmp_path, capsys, monkeypatch
):
    import vitport.convert as convert_module

    monkeypatch.setattr(convert_module, "table_for", lambda *_: _broken_table(_swap_qk))
    out, record = tmp_path / "o", tmp_path / "record.json"
    code, stdout, err = run_cli(
        monkeypatch,
        capsys,
        "convert",
        str(sources["hub"]),
        "--to",
        "hf",
        "--out",
        str(out),
        "--json",
        str(record),
    )
    assert code == 1 and "FAIL" in stdout and "blocks.0.attn.qkv.weight" in err
    assert not out.exists()
    assert json.loads(record.read_text())["verification"]["passed"] is False


def test_cli_existing_out_is_refused(sources, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    code, _, err = run_cli(
        monkeypatch, capsys, "convert", str(sources["apple"]), "--to", "hf", "--out", str(out)
    )
    assert code == 2 and "--overwrite" in err


def test_overwrite_only_replaces_a_conversion(sources, tmp_path, monkeypatch):
    from vitport.errors import VitportError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(VitportError, match="did not write") as refused:
        convert(str(sources["apple"]), "hf", mine, overwrite=True)
    # it was passed: the line says what overwrite cannot do, and does not advise passing it
    assert "replaces only an earlier conversion" in str(refused.value)
    assert "pass overwrite" not in str(refused.value)
    assert (mine / "thesis.tex").read_text() == "precious"
    monkeypatch.chdir(mine)
    with pytest.raises(VitportError, match="working directory"):
        convert(str(sources["apple"]), "hf", ".", overwrite=True)
    assert (mine / "thesis.tex").is_file()


def test_static_batch_larger_than_the_proof_is_refused_before_export(sources, tmp_path):
    from vitport.errors import VitportError

    with pytest.raises(VitportError, match="at most"):
        convert(str(sources["hf-dinov2"]), "onnx", tmp_path / "o", static=True, batch_size=16)


def test_wrong_from_names_the_missing_tensor(sources, tmp_path):
    with pytest.raises(ConversionError, match="lacks tensor 'preprocessor.patchifier.proj.weight'"):
        convert(str(sources["hub"]), "hf", tmp_path / "o", from_layout="aimv2-apple")


# --- the checkpoint's own position grid, timm --weights, and the ONNX file form ----------------

TINY_REG = "vit_tiny_test_patch14_reg4"  # seed 002's vit_small_patch14_reg4_dinov2, but tiny
TINY_REG_ARGS = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def register_tiny_reg() -> None:
    """A timm architecture name for timm:NAME --weights FILE: DINOv2 with registers, tiny."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if timm.is_model(TINY_REG):
        return

    @register_model
    def vit_tiny_test_patch14_reg4(pretrained: bool = False, **kwargs):
        args = dict(
            patch_size=14,
            init_values=1e-5,
            reg_tokens=4,
            no_embed_class=True,
            num_classes=0,
            **TINY_REG_ARGS,
        )
        return _create_vision_transformer(TINY_REG, pretrained=pretrained, **{**args, **kwargs})


@pytest.fixture
def grid518(tmp_path) -> tuple[torch.nn.Module, Path, Path]:
    """A timm DINOv2-with-registers model trained at 518 px (37x37 positions), saved as timm
    saves it: a weights file, and a directory whose config.json states no input size."""
    import timm
    from timm.models._hub import save_for_hf

    model = randomize(
        timm.create_model(
            "vit_small_patch14_reg4_dinov2", pretrained=False, img_size=518, **TINY_REG_ARGS
        )
    ).eval()
    assert model.pos_embed.shape[1] == 37 * 37
    weights = tmp_path / "seed002.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    directory = tmp_path / "timm-518"
    save_for_hf(model, directory, model_args=TINY_REG_ARGS, safe_serialization=True)
    config = json.loads((directory / "config.json").read_text())
    config["model_args"].pop("img_size")
    config["pretrained_cfg"].pop("input_size")
    (directory / "config.json").write_text(json.dumps(config))
    return model, weights, directory


def assert_same_tensors(restored: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    for key, tensor in model.state_dict().items():
        assert torch.equal(restored[key], tensor), key


def test_timm_weights_to_hf_and_back_at_its_own_grid(grid518, tmp_path, capsys, monkeypatch):
    """convert timm:NAME --weights FILE --to hf, and back: 518 px, 1,370 positions, bit-exact."""
    register_tiny_reg()
    model, weights, _ = grid518
    code, stdout, err = run_cli(
        monkeypatch,
        capsys,
        "convert",
        f"timm:{TINY_REG}",
        "--weights",
        str(weights),
        "--to",
        "hf",
        "--out",
        str(tmp_path / "hf"),
    )
    assert code == 0, err
    assert "same function" in stdout
    record = json.loads((tmp_path / "hf" / "conversion.json").read_text())
    assert record["verification"]["image_size"] == 518 and record["function"] == "same"
    assert record["source"]["sha256"] == file_sha256(weights)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["image_size"] == 518
    assert on_disk(tmp_path / "hf")["embeddings.position_embeddings"].shape[1] == 1 + 37 * 37
    back = convert(str(tmp_path / "hf"), "timm", tmp_path / "back")
    assert back.passed and back.image_size == 518
    assert_same_tensors(on_disk(tmp_path / "back"), model)


def test_timm_dir_without_input_size_keeps_its_grid_through_hf_and_back(grid518, tmp_path):
    import vitport

    model, _, directory = grid518
    encoder = vitport.load(str(directory))
    assert encoder.image_size == (518, 518) and encoder.resampled_from is None
    there = convert(str(directory), "hf", tmp_path / "hf")
    assert there.same_function and there.image_size == 518
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["image_size"] == 518
    back = convert(str(tmp_path / "hf"), "timm", tmp_path / "back")
    assert back.same_function and back.image_size == 518
    assert_same_tensors(on_disk(tmp_path / "back"), model)
    returned = vitport.load(str(tmp_path / "back"))
    pixels = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(0))
    assert torch.equal(returned.encode(pixels).patches, encoder.encode(pixels).patches)


def test_config_naming_another_size_is_said_and_the_grid_kept(grid518, tmp_path):
    import vitport

    _, _, directory = grid518
    config = json.loads((directory / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, 224, 224]
    (directory / "config.json").write_text(json.dumps(config))
    encoder = vitport.load(str(directory))
    assert encoder.image_size == (518, 518)
    assert len(encoder.notes) == 1 and "names 224 px input" in encoder.notes[0]
    assert "37x37 (518 px)" in encoder.notes[0]
    result = convert(str(directory), "hf", tmp_path / "hf")  # the note reaches the record
    assert result.same_function and encoder.notes[0] in result.notes


def test_image_size_resampling_is_recorded_as_another_function(grid518, tmp_path):
    import vitport

    _, _, directory = grid518
    encoder = vitport.load(str(directory), image_size=224)
    assert encoder.resampled_from == (37, 37)
    assert any("37x37" in note and "16x16" in note for note in encoder.notes)
    result = convert(str(directory), "hf", tmp_path / "hf", image_size=224)
    assert result.passed and not result.same_function
    record = json.loads((tmp_path / "hf" / "conversion.json").read_text())
    assert record["function"] == "resampled"
    assert record["resampled"] == {"from_grid": [37, 37], "to_grid": [16, 16], "image_size": 224}
    assert any("resampled" in note for note in record["notes"])


def test_infer_names_the_grid_it_resampled_from(grid518, capsys, monkeypatch):
    _, _, directory = grid518
    code, stdout, err = run_cli(
        monkeypatch, capsys, "infer", "-m", str(directory), "--image-size", "224"
    )
    assert code == 0, err
    assert "224x224 input" in stdout and "resampled from the checkpoint's 37x37" in stdout


def test_onnx_out_ending_in_onnx_is_the_file(sources, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "demo.onnx"
    result = convert(str(sources["hf-dinov2"]), "onnx", out)
    assert out.is_file() and result.passed
    record = json.loads((tmp_path / "demo.conversion.json").read_text())
    assert record["target"]["files"] == sorted(
        ["demo.onnx", "demo.conversion.json", "demo.preprocessor_config.json"]
    )
    assert (tmp_path / "demo.preprocessor_config.json").is_file()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (output,) = session.run(["cls"], {"pixel_values": torch.zeros(2, 3, 28, 28).numpy()})
    assert output.shape == (2, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(record["target"]["files"])


def test_onnx_file_out_overwrite_rules(sources, tmp_path):
    from vitport.outputs import OutputError

    out = tmp_path / "demo.onnx"
    convert(str(sources["hf-dinov2"]), "onnx", out)
    with pytest.raises(OutputError, match="already exists"):
        convert(str(sources["hf-dinov2"]), "onnx", out)
    convert(str(sources["hf-dinov2"]), "onnx", out, overwrite=True)  # vitport's own: replaced
    foreign = tmp_path / "other.onnx"
    foreign.write_bytes(b"not vitport's")
    with pytest.raises(OutputError, match="vitport did not write it"):
        convert(str(sources["hf-dinov2"]), "onnx", foreign, overwrite=True)
    assert foreign.read_bytes() == b"not vitport's"


def test_arch_names_the_timm_architecture_of_a_loaded_source(tiny_dir, tmp_path):
    """--arch on a checkpoint vitport loads: the head count and the timm name come from it."""
    from vitport.errors import SpecError

    register_tiny_reg()
    result = convert(str(tiny_dir("dinov2_with_registers")), "timm", tmp_path / "t", arch=TINY_REG)
    assert result.passed and result.arch["heads"] == 2
    assert json.loads((tmp_path / "t" / "config.json").read_text())["architecture"] == TINY_REG
    with pytest.raises(SpecError, match="no such architecture"):
        convert(str(tiny_dir("dinov2")), "timm", tmp_path / "x", arch="no_such_vit")


@pytest.mark.parametrize("name", sorted(TINY))
def test_the_neutral_recipe_gives_the_models_own_pixels(tiny_dir, name):
    """What convert writes beside a converted model (the recipe's processor) preprocesses a
    non-square photo as the model's own processor does: a ViT or SigLIP processor resizes
    straight to a square, a DINOv2 one crops."""
    from PIL import Image
    from skimage import data

    import vitport

    photo = Image.fromarray(data.chelsea())  # 451 × 300
    encoder = vitport.load(str(tiny_dir(name)))
    recipe = encoder.preprocess.recipe
    written = recipe.hf_processor()(images=[photo], return_tensors="pt")["pixel_values"]
    own = encoder.preprocess([photo])
    # timm's PIL transforms round the resize a little differently from transformers'
    atol = 0.05 if encoder.preprocess.settings["processor"] == "timm" else 1e-6
    torch.testing.assert_close(written, own, atol=atol, rtol=0)


def test_a_timm_config_states_no_provenance_it_does_not_know(tiny_dir, tmp_path):
    """timm's registry tags its own pretrained weights (tag lvd142m, licence apache-2.0); a
    converted checkpoint of unknown provenance must not inherit those claims."""
    convert(str(tiny_dir("dinov2")), "timm", tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())["pretrained_cfg"]
    assert not {"tag", "license", "hf_hub_id", "origin_url", "paper_ids"} & set(cfg)
    assert cfg["mean"] and cfg["input_size"]  # the preprocessing stays
