"""Runtimes: each installed one agrees with torch, a lowered precision is caught, the search
picks the fastest faithful configuration across runtimes, and the commands run the winner."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_bench import FAST
from test_compare import cli

import vitport
import vitport.device.timer
from vitport.compare.run import features_of
from vitport.compare.verdict import judge_features, thresholds_for
from vitport.device import resolve_device
from vitport.encoder import RawOutput
from vitport.errors import VitportError
from vitport.inputs import default_inputs
from vitport.runtimes import MODULES, RUNNERS, LimitError, Limits, Runner, Setup, prepare, runner
from vitport.runtimes.openvino_runner import OpenVinoRunner

CPU_RUNTIMES = [n for n in ("onnxruntime", "openvino") if runner(n).missing() is None]


@pytest.fixture(scope="module")
def demo():
    return vitport.load("demo:dinov2-small", "cpu", "fp32")


@pytest.fixture(scope="module")
def inputs():
    return default_inputs()[:4]


@pytest.mark.parametrize("name", RUNNERS.names())
def test_every_runner_declares_where_it_applies_and_what_it_takes(name):
    kind = runner(name)
    assert kind.name == name and len(RUNNERS) == len(MODULES)
    limits = kind.limits
    assert limits.devices and limits.dtypes and limits.min_batch >= 1
    assert limits.max_batch is None or limits.max_batch >= limits.min_batch
    for device in ("cpu", "cuda", "npu"):
        reason = kind.not_applicable(device, "fp32")
        assert (reason is None) == (device in limits.devices)
    assert kind.refusal("no-such-device", Setup(name)) is not None
    kind.release()  # before any build: nothing to let go of, and no error


def test_tensorrt_declares_the_batch_range_its_engine_profile_ends_at():
    from vitport.runtimes import tensorrt_runner

    limits = runner("tensorrt").limits
    assert limits.max_batch == tensorrt_runner.MAX_BATCH == 64
    with pytest.raises(LimitError, match="batch_sizes 256 is beyond what tensorrt takes"):
        limits.check_batches("tensorrt", [64, 256])


def test_the_fp32_export_rule_has_one_home(demo):
    """An exported runtime is built from the fp32 module and runs at the setup's dtype; a torch
    runtime takes the module at that dtype."""
    from vitport.runtimes import source_dtype

    assert source_dtype(Setup("openvino", "bf16")) == "fp32"
    assert source_dtype(Setup("torch", "bf16")) == "bf16"
    assert source_dtype(Setup("tensorrt", "fp16")) == "fp16"  # it compiles the module itself
    prepared = prepare(demo, Setup("torch", "bf16"))
    assert prepared.encoder.dtype == torch.bfloat16 and demo.dtype == torch.float32


@pytest.mark.parametrize("name", CPU_RUNTIMES)
def test_installed_cpu_runtime_agrees_with_torch(name, demo, inputs, tmp_path):
    reference = features_of(demo, inputs, 4)
    built = prepare(demo, Setup(name), cache=tmp_path)
    assert built.encoder.runtime == name and built.build_seconds > 0
    judged = judge_features(
        reference.groups(), features_of(built.encoder, inputs, 2).groups(), thresholds_for("fp32")
    )
    assert judged, judged.verdict.failures
    assert (tmp_path / "onnx").is_dir()  # the export is cached for the next build
    built.release()


@pytest.mark.skipif("openvino" not in CPU_RUNTIMES, reason="openvino is not installed")
def test_openvino_runs_the_precision_it_is_asked_for(demo, inputs, tmp_path):
    """OpenVINO's default on AMX CPUs is bf16: vitport asks for f32, which agrees with torch to
    fp32's rounding. Asked for bf16, it runs what the compiled model says it runs: bf16 where
    the CPU has bf16 (bf16's error shows, on this demo about 0.7%), f32 where it has not (then
    the same error as f32, and labelled fp32). Either way the label is what ran."""
    reference = features_of(demo, inputs, 4)

    def judged_at(precision: str):
        runner_ = OpenVinoRunner()
        forward = runner_.forward_at(demo, tmp_path, precision)
        run = features_of(dataclasses.replace(demo, forward_fn=forward), inputs, 4)
        return runner_.ran_dtype(), judge_features(
            reference.groups(), run.groups(), thresholds_for("fp32")
        )

    (exact_ran, exact), (lowered_ran, lowered) = judged_at("f32"), judged_at("bf16")
    assert exact_ran == "fp32" and exact and exact.worst_rel_error < 1e-4
    assert lowered_ran in ("bf16", "fp32")
    if lowered_ran == "fp32":  # a CPU without bf16: it ran f32, and says so
        assert lowered.worst_rel_error == exact.worst_rel_error
    else:
        assert lowered.worst_rel_error > 100 * exact.worst_rel_error


def test_openvino_asked_for_bf16_on_a_cpu_without_it_is_labelled_fp32(
    monkeypatch, tiny_dir, tmp_path
):
    """The CPU plugin runs a bf16 hint in f32 on a CPU without bf16 units, and the compiled
    model says so: the prepared model is then fp32, with a note, and bench labels it fp32."""
    ov = pytest.importorskip("openvino")
    from vitport.bench.run import bench
    from vitport.runtimes.openvino_runner import ran_precision

    real_core = ov.Core

    class NoBf16Core:  # what the plugin answers on a CPU without bf16
        def __init__(self):
            self.core = real_core()

        def read_model(self, path):
            return self.core.read_model(path)

        def compile_model(self, model, device, config):
            compiled = self.core.compile_model(model, device, {"INFERENCE_PRECISION_HINT": "f32"})

            class Compiled:
                outputs = compiled.outputs
                create_infer_request = compiled.create_infer_request
                get_runtime_model = compiled.get_runtime_model

                def get_property(self, name):
                    return compiled.get_property(name)

            return Compiled()

    monkeypatch.setattr(ov, "Core", NoBf16Core)
    base = vitport.load(str(tiny_dir("dinov2")))
    prepared = prepare(base, Setup("openvino", "bf16"), cache=tmp_path)
    assert prepared.ran_dtype == "fp32" and prepared.fell_back
    assert prepared.ran_setup == Setup("openvino", "fp32")
    assert prepared.encoder.dtype == torch.float32
    assert any("was asked for bf16 and runs fp32 here" in n for n in prepared.encoder.notes)
    result = bench(prepared.encoder, [1], FAST, measure_roofline=False)
    assert result.dtype == "fp32" and result.runtime == "openvino"
    prepared.release()

    class Op:  # a runtime model whose ops all run f32 under a bf16 hint
        def __init__(self, precision):
            self.info = {"runtimePrecision": type("V", (), {"astype": lambda _, t: precision})()}

        def get_rt_info(self):
            return self.info

    class Hinted:
        def __init__(self, hint, precisions):
            self.hint, self.precisions = hint, precisions

        def get_property(self, name):
            assert name == "INFERENCE_PRECISION_HINT"
            return self.hint

        def get_runtime_model(self):
            ops = [Op(p) for p in self.precisions]
            return type("M", (), {"get_ops": lambda _: ops})()

    assert ran_precision(Hinted(ov.Type.bf16, ["f32", "i32"])) == "f32"
    assert ran_precision(Hinted(ov.Type.bf16, ["f32", "bf16"])) == "bf16"
    assert ran_precision(Hinted(ov.Type.f32, ["f32"])) == "f32"


def register(monkeypatch, kind: type[Runner]) -> type[Runner]:
    """A runner registered for this test only."""
    monkeypatch.setitem(RUNNERS._items, kind.name, kind)
    return kind


def fake_runner(name: str, clock, original, seconds: float, noise: float = 0.0, **limits):
    """A runtime whose speed (seconds per call, on the fake clock) and error the test sets:
    the model's own forward, timed as the test says, perturbed by `noise`. `clock` is the
    fake_clock fixture (conftest.py) that vitport's timers read."""

    class Fake(Runner):
        exported = True

        def build(self, encoder, setup, cache):
            def forward(module, pixels) -> RawOutput:
                clock.sleep(seconds)
                raw = original(module, pixels)
                if noise:
                    return RawOutput(raw.tokens * (1 + noise), raw.pooled, raw.logits)
                return raw

            return forward

    Fake.name = name
    Fake.limits = Limits(("cpu",), ("fp32",), **limits)
    return Fake


def test_search_picks_the_faster_faithful_runtime_and_never_an_unfaithful_one(
    monkeypatch, fake_clock, tiny_dir, photos
):
    from vitport.bench.optimize import optimize

    clock = fake_clock
    base = vitport.load(str(tiny_dir("dinov2")))
    original = base.forward_fn
    for name, seconds, noise in (
        ("slow-exact", 0.02, 0.0),
        ("fast-exact", 0.001, 0.0),
        ("fast-wrong", 0.0005, 0.2),
    ):
        register(monkeypatch, fake_runner(name, clock, original, seconds, noise))

    def slow_torch(module, pixels):  # torch itself, made the slowest here
        clock.sleep(0.03)
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
        peaks={"fp32": 1.0},  # injected: a matmul timed on the fake clock would never end
    )
    by_runtime = {t.config.runtime: t for t in result.trials}
    assert set(by_runtime) == {"torch", "slow-exact", "fast-exact", "fast-wrong"}
    assert by_runtime["fast-wrong"].faithful is False and not by_runtime["fast-wrong"].measurements
    speeds = {name: t.speed(2) for name, t in by_runtime.items() if t.measurements}
    want = {"torch": 2 / 0.03, "slow-exact": 2 / 0.02, "fast-exact": 2 / 0.001}
    assert speeds == pytest.approx(want, rel=0.01)  # the clock ticks a microsecond a reading
    trial, batch = result.best()
    assert trial.config.runtime == "fast-exact" and batch == 2
    assert all(t.build_seconds > 0 for t in result.trials)


def test_a_batch_beyond_a_runtimes_limit_is_refused_before_anything_runs(
    monkeypatch, fake_clock, tiny_dir, photos, tmp_path
):
    """bench, embed and serve refuse it in one line naming the parameter and the limit, before
    a single call; the search measures that runtime at the sizes it takes, and says so."""
    from vitport.bench.optimize import optimize
    from vitport.bench.run import bench
    from vitport.embed import embed
    from vitport.serve import ServeConfig
    from vitport.serve.checks import check_options

    model = str(tiny_dir("dinov2"))
    base = vitport.load(model)
    calls = []
    original = base.forward_fn

    def counted(module, pixels):
        calls.append(len(pixels))
        return original(module, pixels)

    register(monkeypatch, fake_runner("small-batch", fake_clock, counted, 0.01, max_batch=4))
    prepared = prepare(base, Setup("small-batch"))
    with pytest.raises(LimitError) as caught:
        bench(prepared.encoder, [2, 8], FAST, measure_roofline=False)
    assert str(caught.value) == (
        "batch_sizes 8 is beyond what small-batch takes (batches of 1 to 4); choose at most 4"
    )
    assert calls == []
    with pytest.raises(LimitError, match="max_batch_size 128 is beyond what small-batch takes"):
        check_options(
            ServeConfig(model, device="cpu", runtime="small-batch", max_batch_size=128), "local"
        )
    with pytest.raises(LimitError, match="batch_size 16 is beyond"):
        embed([str(tmp_path)], model, tmp_path / "emb", runtime="small-batch", batch_size=16)
    assert calls == []
    result = optimize(
        base,
        resolve_device("cpu"),
        photos[:2],
        [2, 8],
        FAST,
        dtypes=("fp32",),
        attentions=("default",),
        compile_options=(False,),
        runtimes=("torch", "small-batch"),
        peaks={"fp32": 1.0},
    )
    limited = next(t for t in result.trials if t.config.runtime == "small-batch")
    assert sorted(limited.measurements) == [2] and max(calls) <= 4
    assert (
        "small-batch: batch 8 not measured; it takes batches of 1 to 4" in result.runtimes_skipped
    )
    torch_trial = next(t for t in result.trials if t.config.runtime == "torch")
    assert sorted(torch_trial.measurements) == [2, 8]


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
    assert code == 2 and "unknown runtime 'tvm'; choose one of torch, compile" in err
    code, _, err = cli(
        monkeypatch, capsys, "bench", "--model", model, "--device", "cpu", "--runtime", "tensorrt"
    )
    line = " ".join(err.split())
    assert code == 2 and ("pip install 'vitport[tensorrt]'" in line or "runs on cuda" in line)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs an NVIDIA GPU")
def test_tensorrt_agrees_with_torch_on_the_gpu(demo, inputs, tmp_path):
    if runner("tensorrt").missing():
        pytest.skip(runner("tensorrt").missing())
    reference = features_of(demo, inputs, 4)
    built = prepare(demo, Setup("tensorrt"), resolve_device("cuda"), cache=tmp_path)
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
    built = prepare(demo, Setup("torchair"), device, cache=tmp_path)
    judged = judge_features(
        reference.groups(), features_of(built.encoder, inputs, 2).groups(), thresholds_for("fp32")
    )
    assert judged, judged.verdict.failures


def test_a_runtime_that_cannot_build_is_one_row_and_the_search_goes_on(
    monkeypatch, tiny_dir, photos
):
    from vitport.bench.optimize import optimize
    from vitport.cli.bench_tables import optimize_table

    class Broken(Runner):
        name = "broken"
        limits = Limits(("cpu",), ("fp32",))
        exported = True

        def build(self, encoder, setup, cache):
            raise RuntimeError("unsupported operator aten::_fancy_attention\nmore detail")

    register(monkeypatch, Broken)
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
