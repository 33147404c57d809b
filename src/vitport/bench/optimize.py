"""`bench --optimize`: the fastest configuration whose output still passes `compare`."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from vitport.bench.configure import configure
from vitport.bench.run import Window, bench_batch
from vitport.bench.timing import Measurement
from vitport.compare.verdict import judge_features, thresholds_for
from vitport.devices import Device, dtype_name, parse_dtype
from vitport.encoder import Encoder, Features
from vitport.errors import VitportError
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
        return {
            "config": asdict(self.config),
            "faithful": self.faithful,
            "worst_rel_error": self.worst_rel_error,
            "failed_checks": self.failed_checks,
            "measurements": {str(b): m.to_dict() for b, m in self.measurements.items()},
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trial:
        return cls(
            config=Config(**data["config"]),
            faithful=data["faithful"],
            worst_rel_error=data["worst_rel_error"],
            failed_checks=data["failed_checks"],
            measurements={
                int(b): Measurement.from_dict(m) for b, m in data["measurements"].items()
            },
            error=data["error"],
        )


@dataclass
class OptimizeResult:
    trials: list[Trial]
    batch_sizes: list[int]

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
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizeResult:
        return cls([Trial.from_dict(t) for t in data["trials"]], data["batch_sizes"])


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
    progress: Callable[[str], None] = lambda _: None,
) -> OptimizeResult:
    """Try each configuration: keep it only if it passes compare against CPU fp32, then time it.

    `base` is the model on the CPU in fp32; it is never modified.
    """
    progress("reference: CPU fp32")
    reference: Features = infer(base, images, batch_size=4).features
    trials = []
    for config in search_space(device, dtypes, attentions, compile_options):
        progress(f"{config.label()}: checking it is faithful")
        trial = Trial(config, faithful=None, worst_rel_error=None)
        trials.append(trial)
        if config.compiled:
            torch._dynamo.reset()  # each configuration compiles afresh, within dynamo's limits
        try:
            candidate = configure(
                base.to(device, parse_dtype(config.dtype)), config.attention, config.compiled
            )
            output = infer(candidate, images, batch_size=4).features
        except (VitportError, RuntimeError, torch.OutOfMemoryError) as exc:
            trial.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            continue
        judged = judge_features(reference.groups(), output.groups(), thresholds_for(config.dtype))
        trial.faithful = bool(judged)
        trial.worst_rel_error = judged.worst_rel_error
        trial.failed_checks = [
            f"{c.group}.{c.metric}={c.value:.3g}" for c in judged.verdict.failures
        ]
        if not trial.faithful and config != BASELINE:
            continue  # unfaithful speed is not worth measuring
        for batch in batch_sizes:
            progress(f"{config.label()}: batch {batch}")
            try:
                run = bench_batch(candidate, batch, window, config.attention, config.compiled)
            except VitportError as exc:
                trial.error = str(exc)
                break
            trial.measurements[batch] = run.measurement
        del candidate
    return OptimizeResult(trials, list(batch_sizes))
