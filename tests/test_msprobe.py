"""msprobe dumps in and out: dumps made by the real msprobe (PrecisionDebugger, in a subprocess
as its users run it) are the reference of compare and report; vitport's own dumps are read by
the real `msprobe compare`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_compare import cli
from test_convert import randomize

from vitport.families.base import bit_processor

pytest.importorskip("msprobe", reason="mindstudio-probe (msprobe) is not installed")
pytestmark = pytest.mark.slow  # msprobe dumps and `msprobe compare` run in subprocesses

DUMP_SCRIPT = Path(__file__).parents[1] / "benchmarks" / "msprobe_dump.py"
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


def dinov2(path: Path, layers: int = 4, hidden: int = 32, seed: int = 1) -> Path:
    """A DINOv2 with weights large enough that a fault shows (see test_convert.randomize)."""
    import transformers

    cfg = transformers.Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    randomize(transformers.Dinov2Model(cfg), seed).save_pretrained(path)
    bit_processor(28, 32).save_pretrained(path)
    return path


def start_dump(model: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(DUMP_SCRIPT), "--model", str(model), "--out", str(out), *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def dumps(tmp_path_factory, tiny_dir) -> dict[str, Path]:
    """The model, and msprobe's dumps of it and of other models, made in parallel."""
    root = tmp_path_factory.mktemp("msprobe")
    model = dinov2(root / "model")
    others = {
        "three_blocks": dinov2(root / "three", layers=3),
        "wider": dinov2(root / "wider", hidden=48),
        "other_seed": dinov2(root / "seed", seed=2),
        "vit": tiny_dir("vit"),
    }
    jobs = {
        "l0": start_dump(model, root / "l0"),
        "mix": start_dump(model, root / "mix", "--level", "mix"),
        "L1": start_dump(model, root / "L1", "--level", "L1"),
        "statistics": start_dump(model, root / "statistics", "--task", "statistics"),
        **{name: start_dump(path, root / name) for name, path in others.items()},
    }
    for name, job in jobs.items():
        out, _ = job.communicate(timeout=600)
        assert job.returncode == 0, f"msprobe dump {name} failed:\n{out[-3000:]}"
    return {"model": model, **{name: root / name for name in jobs}}


def compare_json(monkeypatch, capsys, tmp_path, model, reference, *args):
    out = tmp_path / "result.json"
    code, stdout, err = cli(
        monkeypatch,
        capsys,
        "compare",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--reference",
        str(reference),
        "--json",
        str(out),
        "--overwrite",  # a test may compare more than once
        *args,
    )
    assert code in (0, 1), err
    return json.loads(out.read_text()), stdout


@pytest.mark.parametrize(
    ("level", "fault", "culprit"),
    [
        ("l0", "gelu-tanh@2", "encoder.layer.2.mlp"),
        ("mix", "mlp-scale@1", "encoder.layer.1.mlp"),
        ("l0", "norm-swap@3", "encoder.layer.3.norm1"),
    ],
)
def test_planted_fault_is_named_from_the_dump(
    level, fault, culprit, dumps, monkeypatch, capsys, tmp_path
):
    result, out = compare_json(
        monkeypatch,
        capsys,
        tmp_path,
        dumps["model"],
        dumps[level],
        "--localize",
        "--inject-fault",
        fault,
    )
    loc = result["localization"]
    assert loc["culprit"] == culprit, loc["reason"]
    assert result["reference"]["kind"] == "msprobe"
    assert result["inputs"] == ["forward.0[0]", "forward.0[1]", "forward.1[0]", "forward.1[1]"]
    parts = [p for p in loc["points"] if p["kind"] not in ("embeddings", "block")]
    assert {p["kind"] for p in parts} == {"norm1", "attention", "norm2", "mlp"}
    assert len(parts) == 4 * 4  # every block's parts, from the dump's own records
    assert "msprobe dump" in " ".join(out.split())
    if level == "mix":  # the caption is a whole phrase
        assert result["localization_reference"].endswith("on the dump's own part inputs")


def test_fix_trials_run_from_the_dump(dumps, monkeypatch, capsys, tmp_path):
    result, out = compare_json(
        monkeypatch,
        capsys,
        tmp_path,
        dumps["model"],
        dumps["l0"],
        "--localize",
        "--try-fixes",
        "--inject-fault",
        "gelu-tanh@1",
    )
    trials = {"+".join(t["fixes"]): t for t in result["trials"]}
    worst = max(g["worst"]["rel_error"] for g in result["groups"].values())
    cured = max(g["worst"]["rel_error"] for g in trials["erf-gelu"]["groups"].values())
    assert cured < 0.01 * worst
    assert "best fix: --fix erf-gelu" in out


def test_clean_candidate_agrees_with_its_dump(dumps, monkeypatch, capsys, tmp_path):
    """The dump's tokens are the reference: a clean fp32 CPU candidate is at the fp32 floor."""
    result, _ = compare_json(monkeypatch, capsys, tmp_path, dumps["model"], dumps["l0"])
    assert result["passed"]
    assert result["groups"]["patches"]["mean"]["rel_error"] < 1e-5


def test_step_and_proc_folders_are_accepted(dumps, monkeypatch, capsys, tmp_path):
    step = dumps["l0"] / "step0"
    proc = next(step.iterdir())
    for folder in (step, proc):
        result, _ = compare_json(monkeypatch, capsys, tmp_path, dumps["model"], folder)
        assert result["reference"]["path"] == str(proc)


def refusal(monkeypatch, capsys, model, reference, *args) -> str:
    code, _, err = cli(
        monkeypatch,
        capsys,
        "compare",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--reference",
        str(reference),
        "--localize",
        *args,
    )
    assert code == 2, err
    line = " ".join(err.split())
    assert "Traceback" not in err
    return line


@pytest.mark.parametrize(
    ("dump", "expected"),
    [
        ("statistics", 'holds statistics, no tensors; dump with "task": "tensor"'),
        ("L1", "records API calls only (level L1), no modules; dump at level L0 or mix"),
        ("three_blocks", "the msprobe dump has 3 Dinov2Layer blocks"),
        ("wider", "blocks are 48 wide"),
        ("other_seed", "other weights; dump the same checkpoint"),
        ("vit", "the msprobe dump has no Dinov2Layer modules"),
    ],
)
def test_dumps_that_cannot_work_are_refused(dump, expected, dumps, monkeypatch, capsys):
    assert expected in refusal(monkeypatch, capsys, dumps["model"], dumps[dump])


def copy_of(dump: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(dump, copy)
    return next(copy.glob("step0/*"))


def test_missing_tensor_files_are_refused(dumps, monkeypatch, capsys, tmp_path):
    proc = copy_of(dumps["l0"], tmp_path)
    victim = next((proc / "dump_tensor_data").glob("*Dinov2Layer.forward.1.output.0.pt"))
    victim.unlink()
    line = refusal(monkeypatch, capsys, dumps["model"], proc)
    assert "are missing from" in line and victim.name in line and "copy the whole dump" in line


def test_a_dump_json_cut_short_is_refused(dumps, monkeypatch, capsys, tmp_path):
    proc = copy_of(dumps["l0"], tmp_path)
    text = (proc / "dump.json").read_text()
    (proc / "dump.json").write_text(text[: len(text) // 2])
    line = refusal(monkeypatch, capsys, dumps["model"], proc)
    assert "is cut short or is not JSON" in line and "dump again" in line


class Planted:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["PLANTED_MARK"]),))


def test_tensor_files_are_read_weights_only(dumps, monkeypatch, capsys, tmp_path):
    proc = copy_of(dumps["l0"], tmp_path)
    mark = tmp_path / "code-ran"
    monkeypatch.setenv("PLANTED_MARK", str(mark))
    victim = next((proc / "dump_tensor_data").glob("*Dinov2Layer.forward.0.output.0.pt"))
    torch.save(Planted(), victim)
    line = refusal(monkeypatch, capsys, dumps["model"], proc)
    assert "cannot be read" in line and not mark.exists()


def test_images_beside_a_dump_and_a_folder_without_one_are_refused(
    dumps, monkeypatch, capsys, tmp_path, photos
):
    image = tmp_path / "a.png"
    photos[0].image.save(image)
    line = refusal(monkeypatch, capsys, dumps["model"], dumps["l0"], str(image))
    assert "brings its own inputs" in line
    (tmp_path / "empty").mkdir()
    line = refusal(monkeypatch, capsys, dumps["model"], tmp_path / "empty")
    assert "without an msprobe dump.json" in line


def test_report_reads_a_dump(dumps, monkeypatch, capsys, tmp_path):
    out = tmp_path / "report"
    code, _, err = cli(
        monkeypatch,
        capsys,
        "report",
        "--model",
        str(dumps["model"]),
        "--device",
        "cpu",
        "--golden",
        str(dumps["l0"]),
        "--out",
        str(out),
        "--batch-sizes",
        "1",
        "--min-seconds",
        "0.05",
    )
    assert code == 0, err
    data = json.loads((out / "report.json").read_text())
    assert data["command"]["reference"] == "msprobe"
    assert data["compare"]["reference"]["kind"] == "msprobe"
    assert "msprobe dump" in (out / "README.md").read_text()


def test_msprobe_compare_reads_vitport_dumps(dumps, monkeypatch, capsys, tmp_path):
    """A CPU fp32 and a bf16 dump written by vitport; the real msprobe compare pairs them."""
    model = dumps["model"]
    for dtype in ("fp32", "bf16"):
        code, _, err = cli(
            monkeypatch,
            capsys,
            "infer",
            "--model",
            str(model),
            "--device",
            "cpu",
            "--dtype",
            dtype,
            "--with-blocks",
            "--out",
            str(tmp_path / dtype),
            "--format",
            "msprobe",
            "--block-images",
            "4",
            "--batch-size",
            "2",
        )
        assert code == 0, err
    result = tmp_path / "compare"
    result.mkdir()
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "msprobe"),
            "compare",
            "--target_path",
            str(tmp_path / "bf16" / "step0"),
            "--golden_path",
            str(tmp_path / "fp32" / "step0"),
            "--output_path",
            str(result),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = list(csv.DictReader(next(result.glob("compare_result_*.csv")).open()))
    ours = json.loads((tmp_path / "fp32" / "step0" / "rank0" / "dump.json").read_text())["data"]
    named = {
        r["NPU Name"].split(".forward.")[0]
        + ".forward."
        + r["NPU Name"].split(".forward.")[1].split(".")[0]
        for r in rows
    }
    assert named == set(ours)
    assert all(r["NPU Name"] == r["Bench Name"] for r in rows)
    block_out = [r for r in rows if r["NPU Name"].endswith("Dinov2Layer.forward.0.output.0")]
    assert len(block_out) == 4 and all(0.99 < float(r["Cosine"]) <= 1.0 for r in block_out)
    # and msprobe's own dump of the same model names the same modules as vitport's
    theirs = json.loads(next((dumps["l0"] / "step0").glob("*/dump.json")).read_text())["data"]
    assert set(theirs) == set(ours)


def test_vitport_reads_its_own_dump(dumps, monkeypatch, capsys, tmp_path):
    code, _, err = cli(
        monkeypatch,
        capsys,
        "infer",
        "--model",
        str(dumps["model"]),
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "ours"),
        "--format",
        "msprobe",
        "--block-images",
        "4",
        "--batch-size",
        "2",
    )
    assert code == 0, err
    result, _ = compare_json(
        monkeypatch,
        capsys,
        tmp_path,
        dumps["model"],
        tmp_path / "ours",
        "--localize",
        "--inject-fault",
        "gelu-tanh@2",
    )
    assert result["localization"]["culprit"] == "encoder.layer.2.mlp"


def test_new_faults_change_one_block(tmp_path):
    import vitport
    from vitport.faults import inject

    base = vitport.load(str(dinov2(tmp_path / "m")))
    pixels = torch.randn(1, 3, 28, 28)
    clean = base.encode(pixels).patches
    for fault in ("mlp-scale@1", "norm-swap@1"):
        candidate = base.to(base.device, base.dtype)
        assert "planted" in inject(candidate, fault)
        assert not torch.allclose(candidate.encode(pixels).patches, clean)


def test_a_dump_of_a_wrapping_model_maps_by_prefix(dumps, monkeypatch, capsys, tmp_path):
    """A dump of the backbone inside a larger model (`Module.backbone.encoder.layer.2...`)."""
    proc = copy_of(dumps["l0"], tmp_path)
    data = json.loads((proc / "dump.json").read_text())
    data["data"] = {k.replace("Module.", "Module.backbone.", 1): v for k, v in data["data"].items()}
    (proc / "dump.json").write_text(json.dumps(data))
    result, _ = compare_json(
        monkeypatch,
        capsys,
        tmp_path,
        dumps["model"],
        proc,
        "--localize",
        "--inject-fault",
        "gelu-tanh@2",
    )
    assert result["localization"]["culprit"] == "encoder.layer.2.mlp"


def test_serve_self_checks_against_a_dump(dumps, tmp_path):
    """serve --reference takes what compare --reference takes: the self-check runs on the
    dump's own inputs and judges against its outputs; a planted fault fails it."""
    import httpx

    serving = pytest.importorskip("test_serve")
    with serving.running(tmp_path, str(dumps["model"]), "--reference", str(dumps["l0"])) as server:
        about = httpx.get(f"{server.url}/v1/models").json()["data"][0]["vitport"]
    check = about["self_check"]
    assert check["passed"] and "msprobe dump" in check["reference"], check
    assert check["inputs"] == 4 and check["worst_rel_error"] < 1e-4
    faulty = (
        "--reference",
        str(dumps["l0"]),
        "--inject-fault",
        "mlp-scale@1",
        "-t",
        "rel_error=1e-3",
    )
    with serving.running(tmp_path, str(dumps["model"]), *faulty, ready=False) as server:
        assert server.proc.wait(180) == 1, server.output()
    assert "self-check failed" in server.output() and "msprobe dump" in server.output()
