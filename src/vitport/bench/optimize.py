"""`bench --optimize`: the fastest configuration whose output still passes `compare`."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vitport import records
from vitport.bench.run import Window, bench_batch
from vitport.bench.timing import Measurement
from vitport.compare.verdict import judge_features, thresholds_for
from vitport.device import Device, parse_dtype
from vitport.encoder import Encoder, Features
from vitport.errors import VitportError, one_line
from vitport.format import metric_value
from vitport.infer import infer
from vitport.inputs import LoadedImage
from vitport.runtimes import Setup, available, prepare, runner

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


@dataclass
class OptimizeResult:
    trials: list[Trial]
    batch_sizes: list[int]
    skipped: list[str] = field(default_factory=list)  # configurations the budget left out
    runtimes_skipped: list[str] = field(default_factory=list)  # runtimes that do not apply, why
    budget: float | None = None
    seconds: float = 0.0

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
        """Best faithful throughput over the baseline's at the same batch size."""
        best = self.best()
        if best is None or self.baseline.speed(best[1]) is None:
            return None
        trial, batch = best
        return trial.speed(batch) / self.baseline.speed(batch)

    def to_dict(self) -> dict[str, Any]:
        best = self.best()
        return {
            "batch_sizes": self.batch_sizes,
            "trials": [t.to_dict() for t in self.trials],
            "best": {"config": best[0].config.to_dict(), "batch_size": best[1]} if best else None,
            "speedup_over_baseline": self.speedup(),
            "baseline": BASELINE.to_dict(),
            "skipped": self.skipped,
            "runtimes_skipped": self.runtimes_skipped,
            "budget": self.budget,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizeResult:
        return records.from_dict(cls, data, trials=lambda ts: [Trial.from_dict(t) for t in ts])


DTYPE_ODDS = {"bf16": 0, "fp16": 1, "fp32": 2}  # 16-bit won on every device measured so far
ATTENTION_ODDS = {"default": 0, "sdpa": 1, "flash": 2, "eager": 3}


COST_ORDER = {"eager": 0, "built": 1, "compiled": 2}  # cheapest to try first


def likely_winners_first(configs: Sequence[Setup]) -> list[Setup]:
    """The baseline (every speed-up is measured against it), then the configurations most likely
    to be fastest, cheapest to try first: eager torch, then runtimes built once (an ONNX export,
    an engine), then torch.compile (compilation costs the most); within each, 16-bit before
    fp32 and fused attention before eager."""
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
    progress: Callable[[str], None] = lambda _: None,
) -> OptimizeResult:
    """Try each setup: keep it only if it passes compare against CPU fp32, then time it.

    `base` is the model on the CPU in fp32; it is never modified. `runtimes` (default: every
    one installed that applies to the device) are one more axis; those that do not apply are
    listed with why, and so are batch sizes beyond a runtime's declared limits (that runtime
    is measured at the others). Setups run likeliest winners first; with a `budget` in
    seconds, the search stops before a setup that would not fit, and lists what it skipped.
    """
    start = time.perf_counter()
    chosen, runtimes_skipped = available(device.type, dtypes, runtimes)
    if True not in compile_options and "compile" in chosen:
        chosen.remove("compile")
        runtimes_skipped.append("compile: not asked for (compile_options)")
    progress("reference: CPU fp32")
    reference: Features = infer(base, images, batch_size=4).features
    trials: list[Trial] = []
    configs = likely_winners_first(
        search_space(device, dtypes, attentions, compile_options, chosen)
    )
    taken, limited = batches_within_limits(configs, batch_sizes)
    runtimes_skipped += limited
    spent: dict[str, list[float]] = {kind: [] for kind in COST_ORDER}  # seconds, by cost kind
    skipped: list[str] = []
    for number, config in enumerate(configs, 1):
        elapsed = time.perf_counter() - start
        cost = _expected_seconds(spent, config.cost_kind)
        if budget is not None and trials and elapsed + cost > budget:
            skipped = [c.label() for c in configs[number - 1 :]]
            break
        left = sum(_expected_seconds(spent, c.cost_kind) for c in configs[number - 1 :])
        if budget is not None:
            left = min(left, max(0.0, budget - elapsed))
        eta = f", about {_duration(left)} left" if any(spent.values()) else ""
        progress(f"[{number}/{len(configs)}{eta}] {config.label()}: checking it is faithful")
        began = time.perf_counter()
        trials.append(
            _trial(
                base,
                device,
                images,
                reference,
                config,
                taken[config.runtime],
                window,
                lambda m, label=config.label(): progress(f"{label}: {m}"),
            )
        )
        spent[config.cost_kind].append(time.perf_counter() - began)
    return OptimizeResult(
        trials, list(batch_sizes), skipped, runtimes_skipped, budget, time.perf_counter() - start
    )


def _trial(
    base: Encoder,
    device: Device,
    images: Sequence[LoadedImage],
    reference: Features,
    config: Setup,
    batch_sizes: Sequence[int],
    window: Window,
    progress: Callable[[str], None],
) -> Trial:
    """One configuration: faithful against the reference? Then (if so) its speed by batch."""
    trial = Trial(config, faithful=None, worst_rel_error=None)
    try:
        began = time.perf_counter()
        prepared = prepare(base, config, device)
        candidate = prepared.encoder
        output = infer(candidate, images, batch_size=4).features
        trial.build_seconds = time.perf_counter() - began  # the build, and the first calls
    except (VitportError, RuntimeError, torch.OutOfMemoryError) as exc:
        trial.error = one_line(exc, typed=not isinstance(exc, VitportError))
        return trial
    try:
        _judge_and_time(trial, candidate, reference, output, batch_sizes, window, progress)
    finally:
        prepared.release()
    return trial


def _judge_and_time(
    trial: Trial,
    candidate: Encoder,
    reference: Features,
    output: Features,
    batch_sizes: Sequence[int],
    window: Window,
    progress: Callable[[str], None],
) -> None:
    config = trial.config
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


# how many times an eager try a first try of each kind costs (demo, 2-core CPU)
COST_PRIOR = {"eager": 1.0, "built": 3.0, "compiled": 20.0}


def _expected_seconds(spent: dict[str, list[float]], kind: str) -> float:
    """The mean time of the configurations of this kind tried so far; before one of the kind
    has run, the other kinds' mean scaled by COST_PRIOR; 0 before anything has run."""
    if spent[kind]:
        return sum(spent[kind]) / len(spent[kind])
    for other, times in spent.items():
        if times:
            return sum(times) / len(times) * COST_PRIOR[kind] / COST_PRIOR[other]
    return 0.0


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
