"""Localising against a golden file from another machine: the golden file is written by one
process, the faulty candidate runs in another, and --localize names the block and its part."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import run
from test_convert import hf_dir

import vitport
from vitport import Features
from vitport.errors import GoldenMismatchError
from vitport.golden import GoldenBlocks, golden_blocks

pytestmark = pytest.mark.slow  # the golden files are written by CLI runs in subprocesses


def cli(*args: str) -> subprocess.CompletedProcess:
    # wide, so that a long temp path (an xdist worker's) never wraps a line the tests read
    env = {**os.environ, "PYTHONPATH": str(Path(vitport.__file__).parents[1]), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "vitport", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A 4-block DINOv2 with weights large enough that a fault shows (see test_convert)."""
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
    path = tmp_path_factory.mktemp("golden") / "gpu.safetensors"
    got = cli(
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
    assert got.returncode == 0, got.stderr
    assert "with block states at 5 points" in got.stdout  # embeddings + 4 blocks
    return path


def test_the_file_holds_block_states_named_and_sized(golden, model):
    blocks = GoldenBlocks.open(golden)
    assert blocks.points == ["embeddings", *(f"encoder.layer.{i}" for i in range(4))]
    assert len(blocks.images) == 10 and blocks.dtype == "fp32"
    assert tuple(blocks.read("encoder.layer.2", 3, 5).shape) == (2, 5, 32)  # 2 images, 1+4 tokens
    features = Features.load(golden)  # the final outputs only; block states stay on disk
    assert set(features.groups()) == {"cls", "patches", "pooled"}


def test_a_fault_in_another_process_is_named_with_its_part(golden, model, tmp_path):
    record = tmp_path / "cmp.json"
    got = cli(
        "compare",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--reference",
        str(golden),
        "--localize",
        "--inject-fault",
        "gelu-tanh@2",
        "--json",
        str(record),
    )
    assert got.returncode in (0, 1), got.stderr
    loc = json.loads(record.read_text())["localization"]
    assert loc["culprit"] == "encoder.layer.2.mlp"
    blocks = {p["name"]: p for p in loc["points"] if p["kind"] == "block"}
    assert blocks["encoder.layer.2"]["local"] > 1e-6  # above vitport's identity floor
    for name, point in blocks.items():
        if name != "encoder.layer.2":
            assert point["local"] < 1e-7, (name, point)  # fp32 noise floor: same arithmetic
    assert blocks["encoder.layer.3"]["accumulated"] > 0  # the fault travels on
    assert "golden file's block states" in json.loads(record.read_text())["localization_reference"]


def test_a_bf16_golden_file_still_localises_a_fault_above_bf16_noise(model, tmp_path):
    golden = tmp_path / "bf16.safetensors"
    got = cli(
        "infer",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--dtype",
        "bf16",
        "--out",
        str(golden),
        "--with-blocks",
        "--batch-size",
        "4",
    )
    assert got.returncode == 0, got.stderr
    assert GoldenBlocks.open(golden).dtype == "bf16"
    script = f"""
import json, torch, vitport
from vitport import Features
from vitport.compare.run import compare
from vitport.compare.verdict import thresholds_for
from vitport.inputs import images_by_name
golden = Features.load({str(golden)!r}); golden.meta["path"] = {str(golden)!r}
base = vitport.load({str(model)!r})
candidate = base.to(base.device, torch.bfloat16)
with torch.no_grad():
    candidate.blocks[1].mlp.fc2.weight.mul_(1.5)  # a fault far above bf16 rounding
images, _ = images_by_name(golden.names)
result = compare(base, candidate, golden, images, thresholds_for("bf16"), localize_points=True)
print(json.dumps(result.localization.to_dict()))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(vitport.__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    loc = json.loads(out.stdout.strip().splitlines()[-1])
    assert loc["culprit"].startswith("encoder.layer.1")


def test_refusals(golden, model, tiny_dir, tmp_path, monkeypatch, capsys):
    # refusals need no second process: the CLI runs in this one (the golden file came from another)
    def here(*args: str) -> tuple[int, str]:
        code, _, err = run(monkeypatch, capsys, *args)
        return code, err

    plain = tmp_path / "plain.safetensors"
    assert here("infer", "--model", str(model), "--device", "cpu", "--out", str(plain))[0] == 0
    code, err = here("compare", "--model", str(model), "--reference", str(plain), "--localize")
    assert code == 2 and "--with-blocks" in err

    code, err = here(
        "compare", "--model", str(tiny_dir("dinov2")), "--reference", str(golden), "--localize"
    )
    assert code == 2 and "another model" in err

    # the same weights, but a file whose hook points do not match this model's
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(golden), "pt") as f:
        header, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    header["block_points"] = json.dumps(json.loads(header["block_points"])[:-1])
    tampered = tmp_path / "tampered.safetensors"
    save_file(tensors, str(tampered), metadata=header)
    features = Features.load(tampered)
    features.meta["path"] = str(tampered)
    with pytest.raises(
        GoldenMismatchError, match="other hook points.*only here: \\['encoder.layer.3'\\]"
    ):
        golden_blocks(features, vitport.load(str(model)))

    code, err = here(
        "infer",
        "--model",
        str(model),
        "--out",
        str(tmp_path / "big.safetensors"),
        "--with-blocks",
        "--max-bytes",
        "1000",
    )
    assert code == 2 and "would take" in err and "--max-bytes" in err
