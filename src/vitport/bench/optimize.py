"""`bench --optimize`: the fastest configuration whose output still passes `compare`."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from vitport import records
from vitport.bench.peak import measure_peaks
from vitport.bench.run import Window, bench_batch
from vitport.bench.timing import Measurement
from vitport.compare.verdict import judge_features, thresholds_for
from vitport.device import Device, parse_dtype
from vitport.encoder import Encoder, Features
from vitport.errors import VitportError, one_line
from vitport.format import metric_value
from vitport.infer import infer
from vitport.inputs import LoadedImage
from vitport.runtimes import Prepared, Setup, available, prepare, runner

BASELINE = Setup()  # transformers as loaded: torch, fp32, attention as loaded, no compile


@dataclass
class Trial:
    config: Setup
    faithful: bool | None  # None: could not run
    worst_rel_error: float | None
    failed_checks: list[str] = field(default_factory=list)
    measurements: dict[int, Measurement] = field(default_factory=dict)
    error: str = ""
    build_seconds: float = 0.0  # building the runtime (export, engine, compile), apart from runs
    ran_dtype: str = ""  # what the runtime actually ran where it fell back ("": as asked)
    note: str = ""  # why a faithful trial was not timed

    @property
    def ran(self) -> Setup:
        """The setup as it ran: the one it is labelled and judged by."""
        return replace(self.config, dtype=self.ran_dtype) if self.ran_dtype else self.config

    def label(self) -> str:
        """Its row label, by the precision that ran: "fp32 openvino (bf16 asked)"."""
        asked = f" ({self.config.dtype} asked)" if self.ran_dtype else ""
        return self.ran.label() + asked

    def speed(self, batch: int) -> float | None:
        m = self.measurements.get(batch)
        return m.images_per_second if m else None

    def to_dict(self) -> dict[str, Any]:
        return records.to_dict(  # batch sizes as keys: JSON keys are strings
            self, measurements=lambda ms: {str(b): m.to_dict() for b, m in ms.items()}
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trial:
        return records.from_dict(
            cls,
            data,
            config=Setup.from_dict,
            measurements=lambda ms: {int(b): Measurement.from_dict(m) for b, m in ms.items()},
        )


DRIFT_TOLERANCE = 0.10  # the baseline's speed may move this much (or its own noise) and not drift


@dataclass
class Confirmation:
    """The winner and the baseline timed one after the other when the search ends (baseline,
    winner, baseline, at one batch size): the speed-up comes from these, measured close
    together, and the baseline's speed at the start tells whether the machine drifted."""

    batch_size: int
    baseline_start: float  # img/s, the baseline's trial at the start of the search
    baseline: list[float]  # img/s, just before and just after the winner
    best: float  # img/s, the winner between them
    noise: float = 0.0  # the largest relative IQR of these measurements

    @property
    def tolerance(self) -> float:
        return max(DRIFT_TOLERANCE, 2 * self.noise)

    @property
    def drift(self) -> float:
        """How far the baseline's speed moved over the search: fastest over slowest, less 1."""
        speeds = [self.baseline_start, *self.baseline]
        return max(speeds) / min(speeds) - 1

    @property
    def drifted(self) -> bool:
        return self.drift > self.tolerance

    @property
    def speedup(self) -> float | None:
        """The winner over the baseline timed around it; None when the machine drifted."""
        return None if self.drifted else self.best / (sum(self.baseline) / len(self.baseline))

    def message(self) -> str:
        """One line on the drift, when there was one; "" otherwise."""
        if not self.drifted:
            return ""
        speeds = ", ".join(f"{s:.1f}" for s in self.baseline)
        return (
            f"the machine's speed drifted during the search: the baseline ran at "
            f"{self.baseline_start:.1f} img/s at the start and {speeds} img/s at the end "
            f"(batch {self.batch_size}, {100 * self.drift:.0f}% apart, beyond the "
            f"{100 * self.tolerance:.0f}% its noise allows), so no speed-up is given and the "
            "ranking may be off; run it again on a quiet machine"
        )


@dataclass
class OptimizeResult:
    trials: list[Trial]
    batch_sizes: list[int]
    skipped: list[str] = field(default_factory=list)  # configurations the budget left out
    runtimes_skipped: list[str] = field(default_factory=list)  # runtimes that do not apply, why
    budget: float | None = None
    seconds: float = 0.0
    peaks: dict[str, float] = field(default_factory=dict)  # measured matmul TFLOP/s by dtype
    plan: str = ""  # what the budget covers, said before the search
    confirmation: Confirmation | None = None

    @property
    def baseline(self) -> Trial:
        return next(t for t in self.trials if t.config == BASELINE)

    def best(self) -> tuple[Trial, int] | None:
        """The fastest faithful (trial, batch size)."""
        options = [(t.speed(b), t, b) for t in self.trials if t.faithful for b in t.measurements]
        if not options:
            return None
        _, trial, batch = max(options, key=lambda o: o[0])
        return trial, batch

    def speedup(self) -> float | None:
        """The best faithful throughput over the baseline's at the same batch size, both timed
        close together when the search ended (see Confirmation); 1.0 when the baseline is the
        best; None when there is no best, nothing confirmed it, or the machine drifted."""
        best = self.best()
        if best is None:
            return None
        if best[0].config == BASELINE:
            return 1.0
        return self.confirmation.speedup if self.confirmation else None

    def drift(self) -> str:
        """One line when the machine's speed drifted during the search; "" otherwise."""
        return self.confirmation.message() if self.confirmation else ""

    def to_dict(self) -> dict[str, Any]:
        best = self.best()
        return {
            "batch_sizes": self.batch_sizes,
            "trials": [t.to_dict() for t in self.trials],
            "best": {"config": best[0].config.to_dict(), "batch_size": best[1]} if best else None,
            "speedup_over_baseline": self.speedup(),
            "drift": self.drift(),
            "baseline": BASELINE.to_dict(),
            "skipped": self.skipped,
            "runtimes_skipped": self.runtimes_skipped,
            "budget": self.budget,
            "seconds": self.seconds,
            "peaks": self.peaks,
            "plan": self.plan,
            "confirmation": records.to_dict(self.confirmation) if self.confirmation else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizeResult:
        return records.from_dict(
            cls,
            data,
            trials=lambda ts: [Trial.from_dict(t) for t in ts],
            confirmation=lambda c: records.from_dict(Confirmation, c) if c else None,
        )


DTYPE_ODDS = {"bf16": 0, "fp16": 1, "fp32": 2}  # ties only: measured cost decides the order
ATTENTION_ODDS = {"default": 0, "sdpa": 1, "flash": 2, "eager": 3}


COST_ORDER = {"eager": 0, "built": 1, "compiled": 2}  # cheapest to try first


def likely_winners_first(configs: Sequence[Setup]) -> list[Setup]:
    """The baseline, then the others in the order that breaks ties of measured cost (see
    CostModel): eager torch, then runtimes built once (an ONNX export, an engine), then
    torch.compile; within each, 16-bit before fp32 and fused attention before eager."""
    rest = [c for c in configs if c != BASELINE]
    rest.sort(
        key=lambda c: (
            COST_ORDER[c.cost_kind],
            DTYPE_ODDS.get(c.dtype, 9),
            ATTENTION_ODDS.get(c.attention, 9),
        )
    )
    return [BASELINE, *rest] if BASELINE in configs else rest


def search_space(
    device: Device,
    dtypes: Sequence[str],
    attentions: Sequence[str],
    compile_options: Sequence[bool] = (False, True),
    runtimes: Sequence[str] = ("torch",),
) -> list[Setup]:
    """Every setup the device supports, the baseline first. The torch module varies the
    attention and torch.compile (`compile_options`; naming the runtime "compile" adds the
    compiled ones too); another runtime runs its own graph, in each of its dtypes. A setup
    whose runtime does not apply (see Runner.refusal) is left out."""
    configs = [BASELINE]
    compiles = set(compile_options) | ({True} if "compile" in runtimes else set())
    if "torch" not in runtimes and "compile" not in runtimes:
        compiles = set()
    elif "torch" not in runtimes:
        compiles.discard(False)
    candidates = [
        Setup(dtype=dtype, attention=attention, compiled=compiled)
        for dtype, attention, compiled in itertools.product(dtypes, attentions, sorted(compiles))
    ]
    candidates += [
        Setup(name, dtype)
        for name in runtimes
        if name not in ("torch", "compile")
        for dtype in dtypes
    ]
    for setup in candidates:
        usable = setup.attention != "flash" or device.flash_selectable
        applies = runner(setup.runtime).refusal(device.type, setup) is None
        if (
            setup not in configs
            and usable
            and applies
            and device.supports(parse_dtype(setup.dtype))
        ):
            configs.append(setup)
    return configs


def batches_within_limits(
    configs: Sequence[Setup], batch_sizes: Sequence[int]
) -> tuple[dict[str, list[int]], list[str]]:
    """The batch sizes each runtime of `configs` takes (its declared limits), and one line for
    each runtime that leaves some out."""
    taken: dict[str, list[int]] = {}
    notes: list[str] = []
    for name in dict.fromkeys(c.runtime for c in configs):
        limits = runner(name).limits
        taken[name] = [b for b in batch_sizes if limits.cap(b) == b and b >= limits.min_batch]
        left = [str(b) for b in batch_sizes if b not in taken[name]]
        if left:
            notes.append(
                f"{name}: batch {', '.join(left)} not measured; it takes batches of "
                f"{limits.batch_range()}"
            )
    return taken, notes


# how many times the baseline's trial the first trial of a runtime is guessed to cost (an export
# and a build on top of the same runs; compilation far more), until that runtime's own first
# trial is measured
COST_PRIOR = {"eager": 1.0, "built": 1.5, "compiled": 20.0}
PEAK_PROBE = 1024  # the CPU's matmul size for the search's peaks (an emulated 2048 takes 20 s)


@dataclass
class CostModel:
    """Predicted seconds to try a setup, from measurements: the baseline's trial scaled by the
    measured matmul peaks (a dtype whose peak is k times below fp32's takes k times longer),
    and, once a runtime has been tried, by what its own trials took."""

    peaks: dict[str, float]
    baseline_seconds: float
    seen: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def slowdown(self, dtype: str) -> float:
        """How much slower than fp32 `dtype` runs, by the measured peaks (at least 1: a trial
        is never much shorter than its timing window)."""
        fp32, peak = self.peaks.get("fp32"), self.peaks.get(dtype)
        return max(1.0, fp32 / peak) if fp32 and peak else 1.0

    def observe(self, setup: Setup, seconds: float) -> None:
        self.seen.setdefault((setup.runtime, setup.dtype), []).append(seconds)

    def seconds(self, setup: Setup) -> float:
        same = self.seen.get((setup.runtime, setup.dtype))
        if same:
            return sum(same) / len(same)
        for (name, dtype), times in self.seen.items():
            if name == setup.runtime:
                mean = sum(times) / len(times)
                return mean * self.slowdown(setup.dtype) / self.slowdown(dtype)
        prior = COST_PRIOR[setup.cost_kind]
        return self.baseline_seconds * prior * self.slowdown(setup.dtype)


def plan_search(
    remaining: Sequence[Setup],
    tried_runtimes: set[str],
    cost: CostModel,
    seconds_left: float | None,
) -> tuple[list[Setup], list[Setup]]:
    """The order to try `remaining` in, and what the budget leaves out. First the cheapest setup
    of each runtime not tried yet (cheapest runtime first), so that every runtime is tried;
    then the rest, cheapest first (ties, to two significant digits, in `remaining`'s order). A setup that would not fit in
    `seconds_left` (None: no budget) is left out, and the next ones are still considered."""
    by_cost = sorted(remaining, key=lambda c: (_rounded(cost.seconds(c)), remaining.index(c)))
    firsts: dict[str, Setup] = {}
    for setup in by_cost:
        if setup.runtime not in tried_runtimes:
            firsts.setdefault(setup.runtime, setup)
    ordered = [*firsts.values(), *(c for c in by_cost if c not in firsts.values())]
    planned: list[Setup] = []
    left: list[Setup] = []
    total = 0.0
    for setup in ordered:
        seconds = cost.seconds(setup)
        if seconds_left is None or total + seconds <= seconds_left:
            planned.append(setup)
            total += seconds
        else:
            left.append(setup)
    return planned, left


def _rounded(seconds: float) -> float:
    """Two significant digits: costs a few percent apart (timing noise) are a tie."""
    return float(f"{seconds:.2g}")


def optimize(
    base: Encoder,
    device: Device,
    images: Sequence[LoadedImage],
    batch_sizes: Sequence[int],
    window: Window,
    *,
    dtypes: Sequence[str] = ("fp32", "bf16", "fp16"),
    attentions: Sequence[str] = ("default", "eager", "sdpa"),
    compile_options: Sequence[bool] = (False, True),
    runtimes: Sequence[str] | None = None,
    budget: float | None = None,
    peaks: dict[str, float] | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> OptimizeResult:
    """Try each setup: keep it only if it passes compare against CPU fp32, then time it.

    `base` is the model on the CPU in fp32; it is never modified. `runtimes` (default: every
    one installed that applies to the device) are one more axis; those that do not apply are
    listed with why, and so are batch sizes beyond a runtime's declared limits (that runtime
    is measured at the others).

    The baseline runs first; its time and the matmul peak of each dtype (`peaks`, TFLOP/s by
    dtype; measured on `device` when None) price the others (CostModel). The search then tries
    each runtime's cheapest setup, then the rest cheapest first; with a `budget` in seconds,
    it says up front how many setups fit and which are left out, and skips a setup that would
    not fit. At the end the winner and the baseline are timed again, one after the other: the
    speed-up comes from those, unless the machine's speed drifted (see Confirmation).
    """
    start = time.perf_counter()
    chosen, runtimes_skipped = available(device.type, dtypes, runtimes)
    if True not in compile_options and "compile" in chosen:
        chosen.remove("compile")
        runtimes_skipped.append("compile: not asked for (compile_options)")
    configs = likely_winners_first(
        search_space(device, dtypes, attentions, compile_options, chosen)
    )
    taken, limited = batches_within_limits(configs, batch_sizes)
    runtimes_skipped += limited
    if peaks is None:
        progress("peaks: a matmul in each dtype prices the search")
        probe = PEAK_PROBE if device.type == "cpu" else None
        peaks = measure_peaks(device, sorted({c.dtype for c in configs}), probe, 0.25)
    progress("reference: CPU fp32")
    reference: Features = infer(base, images, batch_size=4).features
    search = _Search(base, device, images, reference, window, taken, progress)

    progress(f"[1/{len(configs)}] {BASELINE.label()}: the baseline, timed first to price the rest")
    began = time.perf_counter()
    search.run(BASELINE)
    cost = CostModel(dict(peaks), time.perf_counter() - began)
    cost.observe(BASELINE, cost.baseline_seconds)
    reserve = _confirmation_seconds(search.trials[0])

    def seconds_left() -> float | None:
        if budget is None:
            return None
        return max(0.0, budget - (time.perf_counter() - start) - reserve)

    remaining = configs[1:]
    planned, left = plan_search(remaining, {BASELINE.runtime}, cost, seconds_left())
    plan = _plan_line(planned, left, len(configs), budget)
    progress(plan)
    while remaining:
        planned, left = plan_search(remaining, search.runtimes_tried, cost, seconds_left())
        if not planned:
            break
        config = planned[0]
        remaining.remove(config)
        done = len(search.trials)
        total = done + len(planned)
        within = f" fitting the budget, {len(configs)} in all" if total < len(configs) else ""
        eta = _duration(sum(cost.seconds(c) for c in planned))
        progress(
            f"[{done + 1}/{total}{within}, about {eta} left] {config.label()}: "
            "checking it is faithful"
        )
        began = time.perf_counter()
        search.run(config)
        cost.observe(config, time.perf_counter() - began)
    confirmation = search.confirm()
    search.release()
    return OptimizeResult(
        search.trials,
        list(batch_sizes),
        [c.label() for c in remaining],
        runtimes_skipped,
        budget,
        time.perf_counter() - start,
        dict(peaks),
        plan,
        confirmation,
    )


def _plan_line(planned: list[Setup], left: list[Setup], total: int, budget: float | None) -> str:
    """What the budget covers, said before the search: how many setups, which are left out."""
    if not left:
        return f"plan: all {total} configurations" + (
            f" fit the budget of {_duration(budget)}" if budget is not None else ""
        )
    return (
        f"plan: the budget of {_duration(budget or 0.0)} covers about {len(planned) + 1} of "
        f"{total} configurations; left out: {', '.join(c.label() for c in left)} (raise "
        "budget to include them)"
    )


def _confirmation_seconds(baseline: Trial) -> float:
    """What timing the baseline twice and the winner once at one batch size should take."""
    runs = [
        m.first_call + sum(m.warmup_times) + sum(m.times) for m in baseline.measurements.values()
    ]
    return 3 * max(runs, default=0.0)


class _Search:
    """The trials so far, with the baseline and the fastest faithful setup kept built, so that
    both can be timed again, one after the other, when the search ends."""

    def __init__(
        self,
        base: Encoder,
        device: Device,
        images: Sequence[LoadedImage],
        reference: Features,
        window: Window,
        taken: dict[str, list[int]],
        progress: Callable[[str], None],
    ) -> None:
        self.base, self.device, self.images, self.reference = base, device, images, reference
        self.window, self.taken, self.progress = window, taken, progress
        self.trials: list[Trial] = []
        self.kept: dict[str, tuple[Trial, Prepared]] = {}  # "baseline" and "best"
        self.runtimes_tried: set[str] = set()

    def run(self, config: Setup) -> Trial:
        trial, prepared = _trial(
            self.base,
            self.device,
            self.images,
            self.reference,
            config,
            self.taken[config.runtime],
            self.window,
            lambda m, label=config.label(): self.progress(f"{label}: {m}"),
            self.trials,
        )
        self.trials.append(trial)
        self.runtimes_tried.add(config.runtime)
        if prepared is not None:
            self._keep(trial, prepared)
        return trial

    def _keep(self, trial: Trial, prepared: Prepared) -> None:
        """Keep the baseline, and the fastest faithful setup so far; release the others."""
        if trial.config == BASELINE:
            self.kept["baseline"] = (trial, prepared)
            return
        current = self.kept.get("best")
        if trial.faithful and _fastest(trial) > (_fastest(current[0]) if current else 0.0):
            if current is not None:
                current[1].release()
            self.kept["best"] = (trial, prepared)
        else:
            prepared.release()

    def confirm(self) -> Confirmation | None:
        """Baseline, winner, baseline at the winner's batch size, one after the other."""
        result = OptimizeResult(self.trials, [])
        best = result.best()
        if best is None or best[0].config == BASELINE or "best" not in self.kept:
            return None
        trial, batch = best
        baseline, winner = self.kept.get("baseline"), self.kept["best"]
        if baseline is None or winner[0] is not trial or baseline[0].speed(batch) is None:
            return None
        self.progress(f"confirming: the baseline and {trial.label()} timed one after the other")
        runs = []
        try:
            for prepared in (baseline[1], winner[1], baseline[1]):
                runs.append(
                    bench_batch(prepared.encoder, batch, self.window, prepared.setup).measurement
                )
        except VitportError:
            return None
        return Confirmation(
            batch,
            baseline[0].speed(batch),
            [runs[0].images_per_second, runs[2].images_per_second],
            runs[1].images_per_second,
            max(m.relative_iqr for m in runs),
        )

    def release(self) -> None:
        for _, prepared in self.kept.values():
            prepared.release()
        self.kept.clear()


def _fastest(trial: Trial) -> float:
    return max((trial.speed(b) or 0.0 for b in trial.measurements), default=0.0)


def _trial(
    base: Encoder,
    device: Device,
    images: Sequence[LoadedImage],
    reference: Features,
    config: Setup,
    batch_sizes: Sequence[int],
    window: Window,
    progress: Callable[[str], None],
    earlier: Sequence[Trial] = (),
) -> tuple[Trial, Prepared | None]:
    """One configuration: faithful against the reference? Then (if so) its speed by batch.
    Returns the trial and, where it was built, what was built (for the caller to release).
    A runtime that fell back to another precision is judged by the one it ran, and not timed
    again where an `earlier` trial ran the same."""
    trial = Trial(config, faithful=None, worst_rel_error=None)
    try:
        began = time.perf_counter()
        prepared = prepare(base, config, device)
        candidate = prepared.encoder
        output = infer(candidate, images, batch_size=4).features
        trial.build_seconds = time.perf_counter() - began  # the build, and the first calls
    except (VitportError, RuntimeError, torch.OutOfMemoryError) as exc:
        trial.error = one_line(exc, typed=not isinstance(exc, VitportError))
        return trial, None
    if prepared.fell_back:
        trial.ran_dtype = prepared.ran_dtype
        progress(f"ran {prepared.ran_dtype}, not {config.dtype}: judged as {prepared.ran_dtype}")
    same = next((t for t in earlier if t.ran == trial.ran and t.measurements), None)
    if same is not None:
        trial.note = f"ran as {same.label()}, measured already"
        batch_sizes = ()
    try:
        _judge_and_time(trial, candidate, reference, output, batch_sizes, window, progress)
    except BaseException:
        prepared.release()
        raise
    return trial, prepared


def _judge_and_time(
    trial: Trial,
    candidate: Encoder,
    reference: Features,
    output: Features,
    batch_sizes: Sequence[int],
    window: Window,
    progress: Callable[[str], None],
) -> None:
    config = trial.ran
    judged = judge_features(reference.groups(), output.groups(), thresholds_for(config.dtype))
    trial.faithful = bool(judged)
    trial.worst_rel_error = judged.worst_rel_error
    trial.failed_checks = [
        f"{c.group}.{c.metric}={metric_value(c.metric, c.value)}" for c in judged.verdict.failures
    ]
    if not trial.faithful and config != BASELINE:
        return  # unfaithful speed is not worth measuring
    for batch in batch_sizes:
        progress(f"batch {batch}")
        try:
            run = bench_batch(candidate, batch, window, config)
        except VitportError as exc:
            trial.error = str(exc)
            break
        trial.measurements[batch] = run.measurement


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
