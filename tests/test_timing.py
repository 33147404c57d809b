"""Timing: per-call device timing, the warm-up and measured windows, and the statistics."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import FakeClock

from vitport.bench.timing import Measurement, TaskSpec, measure
from vitport.device import Device
from vitport.runtimes import Setup

SPEC = TaskSpec(model="test", device="cpu", batch_size=4, image_size=(224, 224))
TICK = 1 / 128  # exact in binary, so sums of fake device times are exact too


class Sleeper:
    """A callable that sleeps a known time on the fake clock (longer on its first call) and counts
    its calls."""

    def __init__(self, clock: FakeClock, seconds: float, first: float | None = None) -> None:
        self.clock = clock
        self.seconds = seconds
        self.first = seconds if first is None else first
        self.calls = 0

    def __call__(self) -> None:
        self.clock.sleep(self.first if self.calls == 0 else self.seconds)
        self.calls += 1


class Clock:
    """A fake device clock: events read it, work advances it; synchronisations are counted."""

    def __init__(self) -> None:
        self.now = 0.0
        self.syncs = 0
        self.calls = 0

    def step(self) -> None:
        self.now += TICK
        self.calls += 1


class FakeEvent:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.at = 0.0

    def record(self) -> None:
        self.at = self.clock.now

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.at - self.at) * 1000.0  # milliseconds, like torch events


def fake_device(clock: Clock, events: bool = True) -> Device:
    """An asynchronous Device whose synchronize and events are fakes driven by ``clock``."""

    class FakeAsyncDevice(Device):
        def synchronize(self) -> None:
            clock.syncs += 1

        def _new_event(self) -> FakeEvent | None:
            return FakeEvent(clock) if events else None

    return FakeAsyncDevice("fake", 0)


def quick(**overrides: float) -> dict[str, float]:
    window = dict(
        warmup_iters=1, warmup_seconds=0.0, min_iters=5, min_seconds=0.0, max_seconds=30.0
    )
    return {**window, **overrides}


# --------------------------------------------------------------------------- the cpu's clock


def test_sleep_is_timed_by_the_clock(fake_clock):
    m = measure(Sleeper(fake_clock, 0.02), Device("cpu"), SPEC, **quick())
    assert m.median == pytest.approx(0.02, abs=1e-5)  # the sleep, and one tick of the reading
    assert m.images_per_second == SPEC.batch_size / m.mean
    assert m.ms_per_image == pytest.approx(1000 * m.mean / SPEC.batch_size)
    assert m.timer == "synchronize"  # cpu: perf_counter around the call


def test_first_call_is_timed_alone(fake_clock):
    fn = Sleeper(fake_clock, 0.005, first=0.1)
    m = measure(fn, Device("cpu"), SPEC, **quick())
    assert m.first_call == pytest.approx(0.1, abs=1e-5)
    assert m.median == pytest.approx(0.005, abs=1e-5)
    assert max(m.warmup_times + m.times) < 0.1  # the slow call is in neither window
    assert fn.calls == 1 + len(m.warmup_times) + len(m.times)


def test_window_runs_until_min_seconds(fake_clock):
    fn = Sleeper(fake_clock, 0.01)
    m = measure(fn, Device("cpu"), SPEC, **quick(min_iters=1, min_seconds=0.1))
    assert sum(m.times) >= 0.1
    assert sum(m.times[:-1]) < 0.1  # it stopped as soon as both were met
    assert fn.calls == 1 + len(m.warmup_times) + len(m.times)


def test_max_seconds_caps_the_window(fake_clock):
    window = quick(min_seconds=1e9, max_seconds=0.05)
    m = measure(Sleeper(fake_clock, 0.01), Device("cpu"), SPEC, **window)
    assert len(m.times) == 5  # 0.05 s of clock, 0.01 s a call


# --------------------------------------------------------------------------- fake device


def test_each_call_is_timed_with_device_events():
    clock = Clock()
    m = measure(clock.step, fake_device(clock), SPEC, **quick(min_iters=6))
    assert m.timer == "events"
    assert m.times == [TICK] * 6  # the event times, not the (tiny) wall-clock time
    assert m.first_call == TICK
    assert m.warmup_times == [TICK]
    assert clock.calls == 8
    assert clock.syncs == 2 * clock.calls  # before each region, and after it


def test_without_events_the_device_is_synchronized_at_both_edges():
    clock = Clock()
    m = measure(clock.step, fake_device(clock, events=False), SPEC, **quick(min_iters=3))
    assert m.timer == "synchronize"
    assert clock.calls == 1 + 1 + 3
    assert clock.syncs == 2 * clock.calls


@pytest.mark.parametrize(
    ("min_iters", "min_ticks", "expected"),
    [(3, 10, 10), (20, 10, 20), (10, 10, 10), (1, 0, 1)],
)
def test_window_needs_both_min_iters_and_min_seconds(min_iters, min_ticks, expected):
    clock = Clock()
    window = quick(min_iters=min_iters, min_seconds=min_ticks * TICK)
    m = measure(clock.step, fake_device(clock), SPEC, **window)
    assert len(m.times) == expected
    assert clock.calls == 1 + 1 + expected


@pytest.mark.parametrize(
    ("warmup_iters", "warmup_ticks", "expected"),
    [(2, 5, 5), (8, 1, 8), (0, 0, 0), (0, 3, 3)],
)
def test_warmup_needs_both_iters_and_seconds(warmup_iters, warmup_ticks, expected):
    clock = Clock()
    window = quick(warmup_iters=warmup_iters, warmup_seconds=warmup_ticks * TICK)
    m = measure(clock.step, fake_device(clock), SPEC, **window)
    assert len(m.warmup_times) == expected
    assert len(m.times) == 5


def test_max_iters_caps_the_window():
    clock = Clock()
    m = measure(
        clock.step, fake_device(clock), SPEC, **quick(min_iters=1, min_seconds=1e9), max_iters=4
    )
    assert len(m.times) == 4


def test_bad_windows_are_refused():
    clock = Clock()
    with pytest.raises(ValueError):
        measure(clock.step, fake_device(clock), SPEC, min_iters=0)
    with pytest.raises(ValueError):
        measure(clock.step, fake_device(clock), SPEC, min_iters=10, max_iters=5)
    assert clock.calls == 0


# --------------------------------------------------------------------------- statistics


def made(times_ms: list[float], batch_size: int = 4) -> Measurement:
    spec = TaskSpec("m", "cpu", batch_size, (224, 224))
    return Measurement(spec, [t / 1000 for t in times_ms], [0.5], first_call=1.5)


def test_percentiles_use_linear_interpolation():
    m = made([float(i) for i in range(1, 101)])  # 1..100 ms
    # numpy "linear": rank (n - 1) q / 100 between sorted neighbours
    assert m.median == pytest.approx(0.0505)
    assert m.p50 == m.median
    assert m.p90 == pytest.approx(0.0901)
    assert m.p95 == pytest.approx(0.09505)
    assert m.p99 == pytest.approx(0.09901)
    assert m.percentile(0) == pytest.approx(0.001)
    assert m.percentile(100) == pytest.approx(0.1)
    assert m.iqr == pytest.approx(0.07525 - 0.02575)
    assert m.mean == pytest.approx(0.0505)
    assert m.min == pytest.approx(0.001) and m.max == pytest.approx(0.1)
    assert m.std == pytest.approx(statistics.stdev(m.times))
    assert m.relative_iqr == pytest.approx(0.0495 / 0.0505)
    with pytest.raises(ValueError):
        m.percentile(101)


def test_percentiles_do_not_depend_on_order():
    assert made([3.0, 1.0, 2.0, 4.0]).median == pytest.approx(0.0025)


def test_throughput():
    m = made([10.0, 20.0, 30.0], batch_size=8)
    assert m.images_per_second == 8 / m.mean
    assert m.images_per_second == pytest.approx(400.0)
    assert m.ms_per_image == pytest.approx(2.5)


def test_single_sample_has_zero_std():
    assert made([5.0]).std == 0.0


def test_empty_measurement_is_refused():
    with pytest.raises(ValueError):
        Measurement(SPEC, [])


def test_round_trip_through_json():
    setup = Setup("torch", "bf16", "sdpa", True, ("fp32-norm",))
    spec = TaskSpec("timm:vit", "cuda:0", 8, (518, 518), setup)
    m = Measurement(spec, [0.0101, 0.0102, 0.0099], [0.02, 0.011], 3.25, "events")
    data = json.loads(json.dumps(m.to_dict()))
    back = Measurement.from_dict(data)
    assert back == m
    assert back.spec.image_size == (518, 518) and back.spec.fixes == ("fp32-norm",)
    assert data["summary"]["median"] == pytest.approx(0.0101)
    assert data["label"] == "bs8 bf16 sdpa compiled fixes=fp32-norm"
    # the spec's JSON stays flat, as before Setup: the setup's fields beside the task's
    assert data["spec"] == {
        "model": "timm:vit",
        "device": "cuda:0",
        "dtype": "bf16",
        "batch_size": 8,
        "image_size": [518, 518],
        "attention": "sdpa",
        "compiled": True,
        "fixes": ["fp32-norm"],
        "runtime": "compile",
    }
    older = {k: v for k, v in data["spec"].items() if k != "runtime"}  # before runtimes
    assert TaskSpec.from_dict(older).setup == setup


def test_label():
    spec = TaskSpec(
        "m", "cuda", 8, (224, 224), Setup(dtype="bf16", attention="sdpa", compiled=True)
    )
    assert spec.label() == "bs8 bf16 sdpa compiled"
    assert TaskSpec("m", "cpu", 1, (224, 224)).label() == "bs1 fp32"
    assert (
        TaskSpec("m", "cpu", 1, (224, 224), Setup("onnxruntime")).label() == "bs1 fp32 onnxruntime"
    )


# --------------------------------------------------------------------------- warnings


def test_steady_times_raise_no_warnings():
    assert made([10.0] * 20).warnings() == []


def test_large_spread_is_warned():
    warnings = made([5.0, 10.0, 20.0, 40.0] * 5).warnings()
    assert any(w.startswith("spread is large: IQR is") for w in warnings)
    assert any("--min-seconds" in w for w in warnings)


def test_moderate_spread_is_noted():
    warnings = made([10.0, 11.0, 12.0, 13.0, 14.0] * 4).warnings()
    assert len(warnings) == 1 and warnings[0].startswith("spread is noticeable")


def test_few_samples_are_warned():
    assert made([10.0] * 5).warnings() == [
        "only 5 samples; raise --min-seconds for a stable median"
    ]


def test_drift_is_warned():
    warnings = made([10.0] * 15 + [12.0] * 5).warnings()
    assert len(warnings) == 1
    assert warnings[0].startswith("times drift: the last quarter of calls is 20% slower")
