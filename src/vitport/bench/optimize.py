"""`bench --optimize`: the fastest configuration whose output still passes `compare`."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from vitport import records
from vitport.bench.configure import configure
from vitport.bench.run import Window, bench_batch
from vitport.bench.timing import Measurement
from vitport.compare.verdict import judge_features, thresholds_for
from vitport.device import Device, dtype_name, parse_dtype
from vitport.encoder import Encoder, Features
from vitport.errors import VitportError
from vitport.format import metric_value
from vitport.images import LoadedImage
from vitport.infer import infer


@dataclass(frozen=True)
class Config:
    dtype: str
    attention: str
    compiled: bool

    def label(self) -> str:
        return f"{self.dtype} {self.attention}{' compiled' if self.compiled else ''}"


BASELINE = Config("fp32", "default", False)  # transformers as loaded: fp32, no torch.compile


@dataclass
class Trial:
    config: Config
    faithful: bool | None  # None: could not run
    worst_rel_error: float | None
    failed_checks: list[str] = field(default_factory=list)
    measurements: dict[int, Measurement] = field(default_factory=dict)
    error: str = ""

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
            config=lambda c: records.from_dict(Config, c),
            measurements=lambda ms: {int(b): Measurement.from_dict(m) for b, m in ms.items()},
        )


@dataclass
class OptimizeResult:
    trials: list[Trial]
    batch_sizes: list[int]
    skipped: list[str] = field(default_factory=list)  # configurations the budget left out

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
            "best": {"config": asdict(best[0].config), "batch_size": best[1]} if best else None,
            "speedup_over_baseline": self.speedup(),
            "baseline": asdict(BASELINE),
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizeResult:
        return records.from_dict(cls, data, trials=lambda ts: [Trial.from_dict(t) for t in ts])


DTYPE_ODDS = {"bf16": 0, "fp16": 1, "fp32": 2}  # 16-bit won on every device measured so far
ATTENTION_ODDS = {"default": 0, "sdpa": 1, "flash": 2, "eager": 3}


def likely_winners_first(configs: Sequence[Config]) -> list[Config]:
    """The baseline (every speed-up is measured against it), then the configurations most likely
    to be fastest: 16-bit before fp32, fused attention before eager, uncompiled before compiled
    (compilation costs the most time to try)."""
    rest = [c for c in configs if c != BASELINE]
    rest.sort(key=lambda c: (c.compiled, DTYPE_ODDS.get(c.dtype, 9),
                             ATTENTION_ODDS.get(c.attention, 9)))  # fmt: skip
    return [BASELINE, *rest] if BASELINE in configs else rest


def search_space(
    device: Device,
    dtypes: Sequence[str],
    attentions: Sequence[str],
    compile_options: Sequence[bool],
) -> list[Config]:
    """Every combination the device supports, the baseline first."""
    configs = [BASELINE]
    for dtype, attention, compiled in itertools.product(dtypes, attentions, compile_options):
        config = Config(dtype_name(parse_dtype(dtype)), attention, compiled)
        usable = attention != "flash" or device.flash_selectable
        if config not in configs and usable and device.supports(parse_dtype(dtype)):
            configs.append(config)
    return configs


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
    budget: float | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> OptimizeResult:
    """Try each configuration: keep it only if it passes compare against CPU fp32, then time it.

    `base` is the model on the CPU in fp32; it is never modified. Configurations run likeliest
    winners first; with a `budget` in seconds, the search stops before a configuration that
    would not fit, and the result lists what it skipped.
    """
    start = time.perf_counter()
    progress("reference: CPU fp32")
    reference: Features = infer(base, images, batch_size=4).features
    trials: list[Trial] = []
    configs = likely_winners_first(search_space(device, dtypes, attentions, compile_options))
    spent: dict[bool, list[float]] = {False: [], True: []}  # seconds per config, by compiled
    skipped: list[str] = []
    for number, config in enumerate(configs, 1):
        elapsed = time.perf_counter() - start
        cost = _expected_seconds(spent, config.compiled)
        if budget is not None and trials and elapsed + cost > budget:
            skipped = [c.label() for c in configs[number - 1 :]]
            break
        left = sum(_expected_seconds(spent, c.compiled) for c in configs[number - 1 :])
        if budget is not None:
            left = min(left, max(0.0, budget - elapsed))
        eta = f", about {_duration(left)} left" if spent[False] or spent[True] else ""
        progress(f"[{number}/{len(configs)}{eta}] {config.label()}: checking it is faithful")
        began = time.perf_counter()
        trials.append(_trial(base, device, images, reference, config, batch_sizes, window,
                             lambda m, label=config.label(): progress(f"{label}: {m}")))  # fmt: skip
        spent[config.compiled].append(time.perf_counter() - began)
    return OptimizeResult(trials, list(batch_sizes), skipped)


def _trial(
    base: Encoder, device: Device, images: Sequence[LoadedImage], reference: Features,
    config: Config, batch_sizes: Sequence[int], window: Window,
    progress: Callable[[str], None],
) -> Trial:  # fmt: skip
    """One configuration: faithful against the reference? Then (if so) its speed by batch."""
    trial = Trial(config, faithful=None, worst_rel_error=None)
    if config.compiled:
        torch._dynamo.reset()  # each configuration compiles afresh, within dynamo's limits
    try:
        candidate = configure(
            base.to(device, parse_dtype(config.dtype)), config.attention, config.compiled
        )
        output = infer(candidate, images, batch_size=4).features
    except (VitportError, RuntimeError, torch.OutOfMemoryError) as exc:
        trial.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return trial
    judged = judge_features(reference.groups(), output.groups(), thresholds_for(config.dtype))
    trial.faithful = bool(judged)
    trial.worst_rel_error = judged.worst_rel_error
    trial.failed_checks = [
        f"{c.group}.{c.metric}={metric_value(c.metric, c.value)}" for c in judged.verdict.failures
    ]
    if not trial.faithful and config != BASELINE:
        return trial  # unfaithful speed is not worth measuring
    for batch in batch_sizes:
        progress(f"batch {batch}")
        try:
            run = bench_batch(candidate, batch, window, config.attention, config.compiled)
        except VitportError as exc:
            trial.error = str(exc)
            break
        trial.measurements[batch] = run.measurement
    return trial


COMPILE_PRIOR = 20.0  # a first torch.compile costs about 20x an uncompiled try (demo, 2-core CPU)


def _expected_seconds(spent: dict[bool, list[float]], compiled: bool) -> float:
    """The mean time of the configurations of this kind tried so far; before a compiled one has
    run, COMPILE_PRIOR times an uncompiled one (compilation dominates); else 0."""
    if spent[compiled]:
        return sum(spent[compiled]) / len(spent[compiled])
    other = spent[not compiled]
    if not other:
        return 0.0
    mean = sum(other) / len(other)
    return mean * COMPILE_PRIOR if compiled else mean / COMPILE_PRIOR


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
