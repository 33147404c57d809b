"""Runtimes: each installed one agrees with torch, a lowered precision is caught, the search
picks the fastest faithful configuration across runtimes, and the commands run the winner."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from test_bench import FAST
from test_compare import cli

import vitport
from vitport.compare.run import features_of
from vitport.compare.verdict import judge_features, thresholds_for
from vitport.device import resolve_device
from vitport.encoder import RawOutput
from vitport.inputs import default_inputs
from vitport.runtimes import RUNTIMES, Runtime, build, openvino_forward

CPU_RUNTIMES = [n for n in ("onnxruntime", "openvino") if RUNTIMES[n].missing() is None]


@pytest.fixture(scope="module")
def demo():
    return vitport.load("demo:dinov2-small", "cpu", "fp32")


@pytest.fixture(scope="module")
def inputs():
    return default_inputs()[:4]


@pytest.mark.parametrize("name", CPU_RUNTIMES)
def test_installed_cpu_runtime_agrees_with_torch(name, demo, inputs, tmp_path):
    reference = features_of(demo, inputs, 4)
    built = build(demo, name, torch.float32, tmp_path)
    assert built.encoder.runtime == name and built.build_seconds > 0
    judged = judge_features(
        reference.groups(), features_of(built.encoder, inputs, 2).groups(), thresholds_for("fp32")
    )
    assert judged, judged.verdict.failures
    assert (tmp_path / "onnx").is_dir()  # the export is cached for the next build


@pytest.mark.skipif("openvino" not in CPU_RUNTIMES, reason="openvino is not installed")
def test_openvino_lowered_precision_under_an_fp32_label_is_unfaithful(demo, inputs, tmp_path):
    """OpenVINO's default on AMX CPUs is bf16: vitport asks for f32, and a run that is not is
    caught by the fp32 limits, not mistaken for fp32."""
    reference = features_of(demo, inputs, 4)
    planted = dataclasses.replace(demo, forward_fn=openvino_forward(demo, tmp_path, "bf16"))
    judged = judge_features(
        reference.groups(), features_of(planted, inputs, 4).groups(), thresholds_for("fp32")
    )
    lowered = torch.randn(1, 3, 224, 224)
    same = openvino_forward(demo, tmp_path, "f32")(None, lowered).tokens
    other = openvino_forward(demo, tmp_path, "bf16")(None, lowered).tokens
    if torch.equal(same, other):
        pytest.skip("this CPU runs OpenVINO's bf16 hint in f32 (no bf16 units)")
    assert not judged


def fake_runtimes(monkeypatch, original):
    """Runtimes whose speed and error the test sets: the same forward, slowed or perturbed."""

    def slowed(seconds: float, noise: float = 0.0):
        def make(encoder, cache):
            def forward(module, pixels) -> RawOutput:
                if seconds:
                    time.sleep(seconds)
                raw = original(module, pixels)
                if noise:
                    return RawOutput(raw.tokens * (1 + noise), raw.pooled, raw.logits)
                return raw

            return forward

        return make

    for name, build_fn in (
        ("slow-exact", slowed(0.02)),
        ("fast-exact", slowed(0.0)),
        ("fast-wrong", slowed(0.0, noise=0.2)),
    ):
        monkeypatch.setitem(
            RUNTIMES, name, Runtime(name, ("cpu",), ("fp32",), (), "", build_fn, False)
        )


def test_search_picks_the_faster_faithful_runtime_and_never_an_unfaithful_one(
    monkeypatch, tiny_dir, photos
):
    from vitport.bench.optimize import optimize

    base = vitport.load(str(tiny_dir("dinov2")))
    original = base.forward_fn
    fake_runtimes(monkeypatch, original)

    def slow_torch(module, pixels):  # torch itself, made the slowest here
        time.sleep(0.03)
        return original(module, pixels)

    base.forward_fn = slow_torch
    result = optimize(
        base,
        resolve_device("cpu"),
        photos,
        [2],
        FAST,
        dtypes=("fp32",),
        attentions=("default",),
        compile_options=(False,),
        runtimes=("torch", "slow-exact", "fast-exact", "fast-wrong"),
    )
    by_runtime = {t.config.runtime: t for t in result.trials}
    assert set(by_runtime) == {"torch", "slow-exact", "fast-exact", "fast-wrong"}
    assert by_runtime["fast-wrong"].faithful is False and not by_runtime["fast-wrong"].measurements
    trial, batch = result.best()
    assert trial.config.runtime == "fast-exact"
    assert trial.speed(batch) > by_runtime["slow-exact"].speed(batch)
    assert all(t.build_seconds > 0 for t in result.trials)


def test_skipped_runtimes_are_listed_with_why(tiny_dir, photos):
    from vitport.bench.optimize import optimize

    base = vitport.load(str(tiny_dir("dinov2")))
    result = optimize(
        base,
        resolve_device("cpu"),
        photos[:2],
        [1],
        FAST,
        dtypes=("fp32",),
        attentions=("default",),
        compile_options=(False,),
        budget=1e-3,
    )
    skipped = " | ".join(result.runtimes_skipped)
    assert "tensorrt" in skipped and "torchair" in skipped
    assert "tensorrt runs on cuda, not cpu" in skipped or "tensorrt needs" in skipped
    data = result.to_dict()
    assert data["runtimes_skipped"] == result.runtimes_skipped and data["budget"] == 1e-3


def test_budget_defaults_to_ten_minutes_and_none_searches_everything():
    from vitport.bench.configure import check_budget
    from vitport.errors import VitportError

    assert check_budget(None, True) == 600.0
    assert check_budget("none", True) is None
    assert check_budget("90", True) == 90.0
    with pytest.raises(VitportError, match="give seconds"):
        check_budget("soon", True)
    with pytest.raises(VitportError, match="applies to optimize=True"):
        check_budget("90", False)


@pytest.mark.skipif(not CPU_RUNTIMES, reason="neither onnxruntime nor openvino is installed")
def test_cli_bench_compare_and_embed_run_a_runtime(monkeypatch, capsys, tiny_dir, tmp_path, photos):
    model = str(tiny_dir("dinov2"))
    name = CPU_RUNTIMES[0]
    out = tmp_path / "b.json"
    code, text, err = cli(
        monkeypatch,
        capsys,
        "bench",
        "--model",
        model,
        "--device",
        "cpu",
        "--runtime",
        name,
        "--batch-sizes",
        "1,2",
        "--min-seconds",
        "0.05",
        "--warmup-seconds",
        "0",
        "--json",
        str(out),
    )
    assert code == 0, err
    assert json.loads(out.read_text())["runtime"] == name and f"runtime {name}" in text
    code, text, err = cli(
        monkeypatch,
        capsys,
        "compare",
        "--model",
        model,
        "--device",
        "cpu",
        "--runtime",
        name,
        "--json",
        str(tmp_path / "c.json"),
    )
    assert code == 0, err
    assert json.loads((tmp_path / "c.json").read_text())["candidate"]["runtime"] == name
    code, _, err = cli(
        monkeypatch,
        capsys,
        "compare",
        "--model",
        model,
        "--device",
        "cpu",
        "--runtime",
        name,
        "--localize",
    )
    assert code == 2 and "--localize hooks the torch modules" in " ".join(err.split())
    folder = tmp_path / "photos"
    folder.mkdir()
    for im in photos[:3]:
        im.image.save(folder / f"{im.name.split(':')[-1]}.png")
    code, _, err = cli(
        monkeypatch,
        capsys,
        "embed",
        str(folder),
        "--model",
        model,
        "--device",
        "cpu",
        "--runtime",
        name,
        "--out",
        str(tmp_path / "emb"),
        "-q",
    )
    assert code == 0, err
    summary = vitport.embed.read(tmp_path / "emb")
    assert len(summary) == 3


def test_cli_refuses_unknown_and_missing_runtimes(monkeypatch, capsys, tiny_dir):
    model = str(tiny_dir("dinov2"))
    code, _, err = cli(monkeypatch, capsys, "bench", "--model", model, "--runtime", "tvm")
    assert code == 2 and "--runtime tvm is unknown" in err
    code, _, err = cli(
        monkeypatch, capsys, "bench", "--model", model, "--device", "cpu", "--runtime", "tensorrt"
    )
    line = " ".join(err.split())
    assert code == 2 and ("pip install 'vitport[tensorrt]'" in line or "runs on cuda" in line)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs an NVIDIA GPU")
def test_tensorrt_agrees_with_torch_on_the_gpu(demo, inputs, tmp_path):
    if RUNTIMES["tensorrt"].missing():
        pytest.skip(RUNTIMES["tensorrt"].missing())
    reference = features_of(demo, inputs, 4)
    built = build(demo.to(resolve_device("cuda")), "tensorrt", torch.float32, tmp_path)
    judged = judge_features(
        reference.groups(), features_of(built.encoder, inputs, 2).groups(), thresholds_for("fp32")
    )
    assert judged, judged.verdict.failures


def test_torchair_agrees_with_torch_on_the_npu(demo, inputs, tmp_path):
    try:
        device = resolve_device("npu")
    except Exception as exc:  # no torch_npu, no CANN, no NPU
        pytest.skip(f"torchair needs an Ascend NPU: {str(exc).splitlines()[0]}")
    reference = features_of(demo, inputs, 4)
    built = build(demo.to(device), "torchair", torch.float32, tmp_path)
    judged = judge_features(
        reference.groups(), features_of(built.encoder, inputs, 2).groups(), thresholds_for("fp32")
    )
    assert judged, judged.verdict.failures


def test_a_runtime_that_cannot_build_is_one_row_and_the_search_goes_on(
    monkeypatch, tiny_dir, photos
):
    from vitport.bench.optimize import optimize
    from vitport.cli.bench_tables import optimize_table

    def broken(encoder, cache):
        raise RuntimeError("unsupported operator aten::_fancy_attention\nmore detail")

    monkeypatch.setitem(
        RUNTIMES, "broken", Runtime("broken", ("cpu",), ("fp32",), (), "", broken, False)
    )
    base = vitport.load(str(tiny_dir("dinov2")))
    result = optimize(
        base,
        resolve_device("cpu"),
        photos[:2],
        [1],
        FAST,
        dtypes=("fp32",),
        attentions=("default", "eager"),
        compile_options=(False,),
        runtimes=("broken", "torch"),
    )
    row = next(t for t in result.trials if t.config.runtime == "broken")
    assert row.faithful is None and "unsupported operator aten::_fancy_attention" in row.error
    assert "more detail" not in row.error
    others = [t for t in result.trials if t.config.runtime == "torch"]
    assert len(others) == 2 and all(t.measurements for t in others)  # the others all ran
    from rich.console import Console

    console = Console(width=500, record=True)
    console.print(optimize_table(result))
    assert "could not run: broken could not build" in console.export_text()
