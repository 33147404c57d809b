"""bench: statistics on a model of known run time, OOM back-off, outputs, regressions, optimize."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest
import torch

import vitport
from vitport.bench.run import BenchResult, Window, bench, regressions
from vitport.encoder import RawOutput

FAST = Window(warmup_iters=1, warmup_seconds=0.0, min_iters=5, min_seconds=0.0)
SLEEP = 0.02


@pytest.fixture
def sleepy(tiny_dir, fake_clock):
    """The tiny DINOv2 with a forward that takes 20 ms of the fake clock per call and fails above
    batch 8."""
    encoder = vitport.load(str(tiny_dir("dinov2")))

    def forward(module, pixels):
        if len(pixels) > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        fake_clock.sleep(SLEEP)
        tokens = torch.zeros(len(pixels), 5, 32)
        return RawOutput(tokens=tokens, pooled=tokens[:, 0])

    encoder.forward_fn = forward
    return encoder


def test_statistics_of_a_known_run_time(sleepy):
    result = bench(sleepy, [1, 4], FAST, measure_roofline=False)
    for row in result.rows():
        assert row["p50_ms"] == pytest.approx(SLEEP * 1000, abs=0.01)
        assert row["images_per_second"] == pytest.approx(
            row["batch_size"] / (row["mean_ms"] / 1000)
        )
        assert row["ms_per_image"] == pytest.approx(row["mean_ms"] / row["batch_size"])
        assert row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["samples"] >= 5
    one, four = result.rows()
    assert four["images_per_second"] == pytest.approx(4 * one["images_per_second"], rel=1e-3)


def test_auto_backs_off_at_out_of_memory(sleepy):
    result = bench(sleepy, None, FAST, measure_roofline=False)
    assert [r.batch_size for r in result.runs] == [1, 2, 4, 8]
    assert result.oom_batch == 16
    assert result.best().batch_size == 8
    assert any("ran out of memory" in n for n in result.notes)


def test_out_of_memory_at_the_first_size_is_an_error(sleepy):
    from vitport.errors import OutOfMemoryError

    with pytest.raises(OutOfMemoryError, match="out of memory"):
        bench(sleepy, [16], FAST, measure_roofline=False)


def test_roofline_numbers_follow_from_the_measurement(tiny_dir):
    encoder = vitport.load(str(tiny_dir("vit")))
    result = bench(encoder, [2], FAST)
    run = result.runs[0]
    expected = result.flops.total * run.measurement.images_per_second / 1e12
    assert result.achieved_tflops(run) == pytest.approx(expected)
    assert result.mfu(run) == pytest.approx(expected / result.peak.tflops)
    assert result.peak.tflops > 0


def test_outputs_schema(sleepy):
    result = bench(sleepy, [1, 2], FAST, measure_roofline=False)
    rows = list(csv.DictReader(io.StringIO(result.to_csv())))
    assert list(rows[0]) == [
        "model",
        "infer_img_size",
        "infer_samples_per_sec",
        "infer_step_time",
        "infer_batch_size",
        "param_count",
        "infer_gmacs",
        "infer_device",
        "infer_dtype",
    ]
    assert [int(r["infer_batch_size"]) for r in rows] == [1, 2]
    data = json.loads(json.dumps(result.to_dict()))
    assert data["schema_version"] == 1 and len(data["runs"][0]["measurement"]["times"]) >= 5
    back = BenchResult.from_dict(data)
    assert back.rows() == result.rows()
    assert result.to_markdown().count("\n") == 4


def test_regressions_beyond_noise(sleepy):
    old = bench(sleepy, [1], FAST, measure_roofline=False)
    same = BenchResult.from_dict(old.to_dict())
    assert regressions(old, same) == []
    slower = BenchResult.from_dict(old.to_dict())
    slower.runs[0].measurement.times = [t * 1.5 for t in slower.runs[0].measurement.times]
    found = regressions(old, slower)
    assert len(found) == 1 and found[0].change == pytest.approx(1 / 1.5 - 1, rel=1e-6)


def test_optimize_keeps_only_faithful_configurations(tiny_dir, photos):
    from vitport.bench.optimize import BASELINE, optimize
    from vitport.device import resolve_device

    base = vitport.load(str(tiny_dir("dinov2")))
    result = optimize(
        base,
        resolve_device("cpu"),
        photos,
        [2],
        FAST,
        dtypes=("fp32", "bf16"),
        attentions=("default", "eager"),
        compile_options=(False,),
        runtimes=("torch",),
    )
    labels = [t.config for t in result.trials]
    assert labels[0] == BASELINE and len(labels) == 4
    for trial in result.trials:
        assert trial.faithful is not None
        assert bool(trial.measurements) == (trial.faithful or trial.config == BASELINE)
    best, batch = result.best()
    assert best.faithful and batch == 2
    if best.config == BASELINE:
        assert result.speedup() == 1.0 and result.confirmation is None
    else:  # from the baseline timed again beside the winner, unless the machine drifted
        assert result.confirmation.batch_size == 2
        assert result.speedup() == result.confirmation.speedup
    json.dumps(result.to_dict())


def test_optimize_runs_likely_winners_first_and_stops_at_the_budget(tiny_dir, photos, fake_clock):
    """Where the measured peaks and times price every setup alike, ties go to the likely
    winners."""
    from vitport.bench.optimize import BASELINE, OptimizeResult, optimize
    from vitport.device import resolve_device

    base = vitport.load(str(tiny_dir("dinov2")))
    original = base.forward_fn

    def forward(module, pixels):  # every dtype and attention alike: 10 ms a call
        fake_clock.sleep(0.01)
        return original(module, pixels)

    base.forward_fn = forward
    peaks = {"fp32": 1.0, "bf16": 2.0}  # bf16 units: no setup costs more than the baseline
    seen: list[str] = []
    result = optimize(
        base,
        resolve_device("cpu"),
        photos,
        [2],
        FAST,
        dtypes=("fp32", "bf16"),
        attentions=("eager", "default"),
        compile_options=(False,),
        budget=1e-3,
        runtimes=("torch",),
        peaks=peaks,
        progress=seen.append,
    )
    assert [t.config for t in result.trials] == [BASELINE]  # the baseline always runs
    assert result.skipped[0] == "bf16 default" and len(result.skipped) == 3
    assert OptimizeResult.from_dict(result.to_dict()).skipped == result.skipped
    whole = optimize(
        base,
        resolve_device("cpu"),
        photos,
        [2],
        FAST,
        dtypes=("fp32", "bf16"),
        attentions=("eager", "default"),
        compile_options=(False,),
        runtimes=("torch",),
        peaks=peaks,
        progress=seen.append,
    )
    assert [t.config.label() for t in whole.trials] == [
        "fp32 default",
        "bf16 default",
        "bf16 eager",
        "fp32 eager",
    ]
    assert any(m.startswith("[2/4, about ") and " left] " in m for m in seen)
    assert "plan: all 4 configurations" in seen


def test_cli_bench(monkeypatch, capsys, tiny_dir, tmp_path):
    from vitport.cli import main

    out = tmp_path / "b.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "vitport",
            "bench",
            "--model",
            str(tiny_dir("vit")),
            "--device",
            "cpu",
            "--batch-sizes",
            "1,2",
            "--min-seconds",
            "0.2",
            "--warmup-seconds",
            "0.1",
            "--json",
            str(out),
            "--csv",
            str(tmp_path / "b.csv"),
        ],
    )
    monkeypatch.setenv("COLUMNS", "200")
    main()
    text = capsys.readouterr().out
    assert "p99 ms" in text and "MFU" in text and "GFLOPs per image" in text
    assert json.loads(out.read_text())["rows"][1]["batch_size"] == 2
    monkeypatch.setattr(
        sys, "argv", ["vitport", "bench", "--model", str(tiny_dir("vit")), "--batch-sizes", "0,x"]
    )
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2


@pytest.mark.parametrize("family", ["dinov2", "timm_vit_reg4"])
@pytest.mark.parametrize("attention", ["eager", "sdpa", "flash"])
def test_attention_backends_give_the_same_features(family, attention, tiny_dir):
    from vitport.runtimes import Setup, prepare

    base = vitport.load(str(tiny_dir(family)))
    pixels = torch.randn(2, 3, *base.image_size)
    ref = base.encode(pixels)
    switched = prepare(base, Setup(attention=attention)).encoder
    out = switched.encode(pixels)
    assert torch.allclose(out.patches, ref.patches, atol=1e-5)
    if family == "timm_vit_reg4":
        fused = {m.fused_attn for m in switched.module.modules() if hasattr(m, "fused_attn")}
        assert fused == {attention != "eager"}
    else:
        assert switched.module.config._attn_implementation == (
            "eager" if attention == "eager" else "sdpa"
        )


def test_unknown_attention_is_refused():
    from vitport.errors import VitportError
    from vitport.runtimes import Setup

    with pytest.raises(VitportError, match="choose one of default, eager, sdpa, flash"):
        Setup(attention="xformers")


def test_flash_attention_is_refused_where_the_backend_picks_its_own_kernel():
    from types import SimpleNamespace

    from vitport.errors import VitportError
    from vitport.runtimes.torch_runner import set_attention

    npu_like = SimpleNamespace(device=SimpleNamespace(flash_selectable=False), spec="x")
    with pytest.raises(VitportError, match="use attention='sdpa'$") as caught:
        set_attention(npu_like, "flash")
    from vitport.cli.flags import cli_message

    assert cli_message(caught.value).startswith("--attn flash: on the NPU")
    assert cli_message(caught.value).endswith("use --attn sdpa")


def test_a_peak_the_model_outruns_gives_no_mfu(sleepy, monkeypatch):
    """A busy device can measure a 'peak' below what the model achieved: MFU over 100% is never
    printed; the row says n/a and a note says why."""
    from vitport.bench import run as bench_run
    from vitport.bench.peak import PeakResult

    monkeypatch.setattr(bench_run, "measure_peak", lambda *_: PeakResult("fp32", 8, 1e-9, 1.0, 1))
    result = bench(sleepy, [1], FAST)
    assert [row["mfu"] for row in result.rows()] == [None]
    assert any(n.startswith("MFU not shown: the model ran at") for n in result.notes)
    monkeypatch.setattr(bench_run, "measure_peak", lambda *_: PeakResult("fp32", 8, 1e6, 1.0, 1))
    fine = bench(sleepy, [1], FAST)
    assert 0 < fine.rows()[0]["mfu"] < 1
    assert not any(n.startswith("MFU not shown") for n in fine.notes)


@pytest.mark.slow
def test_compiled_encoder_builds_one_graph_for_every_batch_of_two_or_more(tiny_dir):
    from torch._dynamo.utils import counters

    from vitport.runtimes import Setup, prepare

    base = vitport.load(str(tiny_dir("dinov2")))
    pixels = torch.randn(8, 3, *base.image_size)
    want = base.encode(pixels).patches
    torch._dynamo.reset()
    counters.clear()
    prepared = prepare(base, Setup(compiled=True))
    compiled = prepared.encoder
    for batch in (4, 2, 8, 3):
        out = compiled.encode(pixels[:batch])
        assert torch.allclose(out.patches, want[:batch], atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
    prepared.release()
