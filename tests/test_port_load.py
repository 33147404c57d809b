"""Loading a port brings its proof: vitport.load applies the port's dtype and fixes (unless
given others) with one note, refuses weights that no longer match vitport.json, loads a port
made without its weights from its source, and `vitport compare` with no --reference checks a
port against its own golden file, catching a planted fault and naming the diverging block."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from test_cli import run
from test_convert import hf_dir

import vitport
from vitport import Features
from vitport.cli import main
from vitport.errors import WeightsError
from vitport.port.manifest import GOLDEN, MANIFEST, WEIGHTS, Manifest


def cli_once(*args: str) -> None:
    """The CLI in this process, for a fixture (no monkeypatch there); it must succeed."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["vitport", *args])
        patch.setenv("COLUMNS", "200")
        try:
            main()
        except SystemExit as exc:
            assert not exc.code, args


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A 4-block DINOv2 with weights large enough that a fault shows (as test_golden_blocks)."""
    return hf_dir(
        tmp_path_factory.mktemp("m") / "dinov2",
        "Dinov2Model",
        "Dinov2Config",
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )


@pytest.fixture(scope="module")
def golden(model, tmp_path_factory) -> Path:
    """The reference's golden file, with block states, as a packaged port carries it."""
    path = tmp_path_factory.mktemp("golden") / GOLDEN
    cli_once(
        "infer",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--out",
        str(path),
        "--with-blocks",
        "--batch-size",
        "4",
    )
    return path


@pytest.fixture(scope="module")
def sha256(model) -> str:
    return vitport.load(str(model)).weights_sha256


def make_port(
    where: Path,
    model: Path,
    golden: Path,
    sha256: str,
    dtype: str = "bf16",
    fixes: tuple[str, ...] = ("layernorm-fp32",),
    weights: bool = True,
) -> Path:
    """A port by hand, as report --package writes one: weights and config, golden file,
    vitport.json."""
    if weights:
        shutil.copytree(model, where)
    else:
        where.mkdir(parents=True)
    shutil.copy(golden, where / GOLDEN)
    Manifest(
        source=str(model),
        weights_sha256=sha256,
        weights_included=weights,
        family="transformers/dinov2",
        device_type="cpu",
        dtype=dtype,
        fixes=fixes,
        image_size=(28, 28),
    ).write(where)
    return where


@pytest.fixture(scope="module")
def port(model, golden, sha256, tmp_path_factory) -> Path:
    return make_port(tmp_path_factory.mktemp("ports") / "bf16", model, golden, sha256)


@pytest.fixture(scope="module")
def fp32_port(model, golden, sha256, tmp_path_factory) -> Path:
    """A port whose dtype and fixes a CPU run reproduces exactly: it passes its golden file."""
    where = tmp_path_factory.mktemp("ports") / "fp32"
    return make_port(where, model, golden, sha256, "fp32", ("erf-gelu",))


def port_notes(encoder) -> list[str]:
    return [n for n in encoder.notes if n.startswith("port:")]


# --- the library ---------------------------------------------------------------------------------


def test_a_port_loads_at_its_own_dtype_and_fixes_and_says_so_once(port, model, photos):
    encoder = vitport.load(str(port))
    assert encoder.dtype == torch.bfloat16 and encoder.fixes == ["layernorm-fp32"]
    assert port_notes(encoder) == [
        "port: bf16 with layernorm-fp32 from vitport.json (pass dtype=/fixes= to override)"
    ]
    assert encoder.port is not None and encoder.port.dtype == "bf16"
    by_hand = vitport.load(str(model), "cpu", "bf16", fixes=["layernorm-fp32"])
    pixels = encoder.preprocess([im.image for im in photos])
    assert torch.equal(encoder.encode(pixels).patches, by_hand.encode(pixels).patches)
    assert encoder.to(copy=True).port == encoder.port  # the manifest travels with the encoder


def test_the_caller_overrides_the_ports_dtype_and_fixes(port):
    fp32 = vitport.load(str(port), dtype="fp32")
    assert fp32.dtype == torch.float32 and fp32.fixes == ["layernorm-fp32"]
    assert port_notes(fp32) == [
        "port: layernorm-fp32 from vitport.json, fp32 as given (its own: bf16; pass "
        "dtype=/fixes= to override)"
    ]
    bare = vitport.load(str(port), fixes=[])
    assert bare.dtype == torch.bfloat16 and bare.fixes == []
    assert "no fixes as given" in port_notes(bare)[0]
    chosen = vitport.load(str(port), "cpu", "fp32", fixes=["erf-gelu"])
    assert chosen.fixes == ["erf-gelu"] and chosen.dtype == torch.float32
    assert port_notes(chosen) == [] and chosen.port is not None  # the caller chose everything


def test_a_model_that_is_no_port_loads_as_before(model):
    encoder = vitport.load(str(model))
    assert encoder.dtype == torch.float32 and encoder.fixes == [] and encoder.port is None
    assert port_notes(encoder) == []


def test_a_port_made_without_its_weights_loads_its_source(model, golden, sha256, tmp_path):
    where = make_port(tmp_path / "no-weights", model, golden, sha256, weights=False)
    assert not (where / WEIGHTS).exists() and not (where / "config.json").exists()
    encoder = vitport.load(str(where))
    assert encoder.weights_sha256 == sha256 and encoder.spec == str(where)
    assert encoder.dtype == torch.bfloat16 and encoder.fixes == ["layernorm-fp32"]
    other = changed_weights(model, tmp_path / "other")
    manifest = json.loads((where / MANIFEST).read_text())
    (where / MANIFEST).write_text(json.dumps({**manifest, "source": str(other)}))
    with pytest.raises(WeightsError, match="do not match its vitport.json"):
        vitport.load(str(where))  # its source has changed since it was packaged


def changed_weights(directory: Path, where: Path) -> Path:
    """A copy of a port (or checkpoint) whose weights were changed after it was packaged."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(directory, where)
    state = load_file(where / WEIGHTS)
    name = next(n for n in state if n.endswith("mlp.fc1.weight"))
    state[name] = state[name] * 1.01
    save_file(state, where / WEIGHTS, metadata={"format": "pt"})
    return where


def test_weights_that_no_longer_match_the_manifest_are_refused(port, tmp_path):
    changed = changed_weights(port, tmp_path / "changed")
    with pytest.raises(WeightsError, match="do not match its vitport.json"):
        vitport.load(str(changed))


# --- the CLI -------------------------------------------------------------------------------------


def test_infer_runs_a_port_as_packaged_and_says_so(monkeypatch, capsys, port, tmp_path):
    out = tmp_path / "f.safetensors"
    code, stdout, err = run(
        monkeypatch, capsys, "infer", "--model", str(port), "--device", "cpu", "--out", str(out)
    )
    assert code == 0, err
    assert stdout.count("port: ") == 1
    assert "port: bf16 with layernorm-fp32 from vitport.json (give --dtype/--fix to override)" in (
        stdout
    )
    meta = Features.load(out).meta
    assert meta["dtype"] == "bf16" and meta["fixes"] == ["layernorm-fp32"]


def test_infer_flags_override_the_port(monkeypatch, capsys, port, model, tmp_path):
    out = tmp_path / "f.safetensors"
    code, stdout, err = run(
        monkeypatch,
        capsys,
        "infer",
        "--model",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--fix",
        "none",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert "port: fp32 with no fixes as given (its own: bf16 with layernorm-fp32)" in stdout
    meta = Features.load(out).meta
    assert meta["dtype"] == "fp32" and meta["fixes"] == []
    code, stdout, err = run(monkeypatch, capsys, "infer", "--model", str(model), "--device", "cpu")
    assert code == 0, err
    assert "port:" not in stdout  # a model that is no port: output as before


def test_a_port_whose_weights_changed_is_refused_in_one_line(monkeypatch, capsys, port, tmp_path):
    changed = changed_weights(port, tmp_path / "changed")
    for command in ("infer", "compare"):
        code, stdout, err = run(
            monkeypatch, capsys, command, "--model", str(changed), "--device", "cpu"
        )
        assert code == 2, (command, stdout, err)
        assert len(err.strip().splitlines()) == 1 and "do not match its vitport.json" in err


def compare(monkeypatch, capsys, tmp_path, spec: str, *args: str) -> tuple[int, str, dict]:
    record = tmp_path / "cmp.json"
    code, stdout, err = run(
        monkeypatch,
        capsys,
        "compare",
        "--model",
        spec,
        "--device",
        "cpu",
        "--json",
        str(record),
        "--overwrite",
        *args,
    )
    assert code in (0, 1), err
    return code, stdout, json.loads(record.read_text())


def test_compare_checks_a_port_against_its_own_golden_file(
    monkeypatch, capsys, fp32_port, tmp_path
):
    code, stdout, result = compare(monkeypatch, capsys, tmp_path, str(fp32_port))
    assert code == 0 and result["passed"], stdout
    assert result["reference"]["kind"] == "golden"
    assert result["reference"]["path"] == str(fp32_port / GOLDEN)
    assert "reference: the port's own golden file" in stdout
    assert result["candidate"]["dtype"] == "fp32"
    assert result["candidate"]["fixes"] == ["erf-gelu"]  # the port's fixes reach the candidate
    assert "port: fp32 with erf-gelu from vitport.json" in stdout


def test_the_ports_dtype_and_fixes_reach_the_compared_candidate(
    monkeypatch, capsys, port, tmp_path
):
    _, _, result = compare(monkeypatch, capsys, tmp_path, str(port))
    assert result["candidate"]["dtype"] == "bf16"
    assert result["candidate"]["fixes"] == ["layernorm-fp32"]
    assert result["floor_dtype"] == "bf16"
    _, _, result = compare(monkeypatch, capsys, tmp_path, str(port), "--dtype", "fp32")
    assert result["candidate"]["dtype"] == "fp32"
    assert result["candidate"]["fixes"] == ["layernorm-fp32"]


def test_a_planted_fault_fails_the_port_and_its_block_is_named(
    monkeypatch, capsys, fp32_port, tmp_path
):
    code, stdout, result = compare(
        monkeypatch,
        capsys,
        tmp_path,
        str(fp32_port),
        "--localize",
        "--inject-fault",
        "mlp-scale@2",
    )
    assert code == 1 and not result["passed"]
    assert result["reference"]["path"] == str(fp32_port / GOLDEN)
    assert result["localization"]["culprit"].startswith("encoder.layer.2")
    assert "first diverging point: encoder.layer.2" in stdout
    assert "golden file's block states" in result["localization_reference"]


def test_an_explicit_reference_still_wins(monkeypatch, capsys, fp32_port, tmp_path):
    code, stdout, result = compare(monkeypatch, capsys, tmp_path, str(fp32_port), "-r", "cpu")
    assert code == 0, stdout
    assert result["reference"]["kind"] != "golden"
    assert "golden file" not in stdout


def test_a_port_without_its_golden_file_asks_for_a_reference(
    monkeypatch, capsys, fp32_port, tmp_path
):
    where = tmp_path / "no-golden"
    shutil.copytree(fp32_port, where)
    (where / GOLDEN).unlink()
    code, _, err = run(monkeypatch, capsys, "compare", "--model", str(where), "--device", "cpu")
    assert code == 2 and "no golden file" in err and "--reference" in err


# --- from a hub ----------------------------------------------------------------------------------


@pytest.fixture
def hub(fp32_port, port, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants
    from hubstub import StubHub

    with StubHub() as stub:
        stub.add("org/port", port)
        stub.add("org/fp32-port", fp32_port)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", stub.url)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("VITPORT_ATOMGIT_ENDPOINT", stub.url)
        monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "5")
        yield stub


def test_a_port_from_a_hub_brings_its_settings_and_its_golden_file(
    hub, monkeypatch, capsys, tmp_path
):
    encoder = vitport.load("hf:org/port")
    assert encoder.dtype == torch.bfloat16 and encoder.fixes == ["layernorm-fp32"]
    assert len(port_notes(encoder)) == 1
    code, stdout, result = compare(monkeypatch, capsys, tmp_path, "atomgit:org/fp32-port")
    assert code == 0, stdout
    assert result["reference"]["kind"] == "golden"
    assert "reference: the port's own golden file" in stdout
    assert result["candidate"]["fixes"] == ["erf-gelu"]


# --- a port as report --package writes it --------------------------------------------------------


@pytest.fixture(scope="module")
def packaged(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packaged") / "port"
    cli_once(
        "report",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--fix",
        "erf-gelu",
        "--batch-sizes",
        "1",
        "--min-seconds",
        "0.05",
        "--out",
        str(out),
        "--package",
    )
    return out


def test_a_packaged_port_re_verifies_itself_and_names_a_planted_fault(
    monkeypatch, capsys, packaged, tmp_path
):
    code, stdout, result = compare(monkeypatch, capsys, tmp_path, str(packaged))
    assert code == 0, stdout
    assert result["reference"]["path"] == str(packaged / GOLDEN)
    assert result["candidate"]["fixes"] == ["erf-gelu"]
    assert "port: fp32 with erf-gelu from vitport.json" in stdout
    code, stdout, result = compare(
        monkeypatch,
        capsys,
        tmp_path,
        str(packaged),
        "--localize",
        "--inject-fault",
        "norm-swap@2",  # a weight fault, above the noise of the package's 16-bit block states
    )
    assert code == 1 and "FAIL" in stdout
    assert result["localization"]["culprit"].startswith("encoder.layer.2")
    assert "first diverging point: encoder.layer.2" in stdout
