"""Time one call (one batch) many times on a device, honestly, and summarise the samples.

Modelled on ``torch.utils.benchmark``'s ``TaskSpec`` and ``Measurement``, with one difference
that matters on asynchronous devices (CUDA, Ascend NPU, ...): every call is timed with
:meth:`vitport.device.Device.timer`, which bounds the region with device events or
synchronises the device at its edges, so queued-but-unfinished work is never missed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vitport import records
from vitport.device import Device
from vitport.runtimes.base import Setup

__all__ = ["Measurement", "TaskSpec", "measure"]

# Relative IQR (IQR / median) above which a spread warning is raised; torch.utils.benchmark
# uses the same two thresholds.
SPREAD_NOTE = 0.10
SPREAD_LARGE = 0.25
FEW_SAMPLES = 10
# Mean of the last quarter of samples vs the first quarter, above which the times drift.
DRIFT = 0.10


@dataclass(frozen=True)
class TaskSpec:
    """What was measured: model, device, batch and image size, and the Setup that ran it
    (runtime, dtype, attention, compiled, fixes)."""

    model: str
    device: str
    batch_size: int
    image_size: tuple[int, int]
    setup: Setup = field(default_factory=Setup)

    @property
    def dtype(self) -> str:
        return self.setup.dtype

    @property
    def attention(self) -> str:
        return self.setup.attention

    @property
    def compiled(self) -> bool:
        return self.setup.compiled

    @property
    def fixes(self) -> tuple[str, ...]:
        return self.setup.fixes

    @property
    def runtime(self) -> str:
        return self.setup.runtime

    def label(self) -> str:
        """A short row label, e.g. ``"bs8 bf16 sdpa compiled"`` or ``"bs8 fp32 onnxruntime"``.

        The attention name is left out when it is ``"default"``, the runtime when it is torch
        itself; precision fixes, if any, come last as ``"fixes=a,b"``.
        """
        parts = [f"bs{self.batch_size}", self.dtype]
        if not self.setup.torch_runtime:
            parts.append(self.runtime)
        if self.attention != "default":
            parts.append(self.attention)
        if self.compiled:
            parts.append("compiled")
        if self.fixes:
            parts.append("fixes=" + ",".join(self.fixes))
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Flat, as before Setup: the setup's fields beside the task's."""
        setup = self.setup.to_dict()
        return {
            "model": self.model,
            "device": self.device,
            "dtype": setup.pop("dtype"),
            "batch_size": self.batch_size,
            "image_size": list(self.image_size),
            **{k: setup[k] for k in ("attention", "compiled", "fixes", "runtime")},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSpec:
        setup = Setup.from_dict({k: v for k, v in d.items() if k in Setup.__dataclass_fields__})
        return cls(d["model"], d["device"], int(d["batch_size"]), tuple(d["image_size"]), setup)


@dataclass
class Measurement:
    """Raw per-call samples (seconds; one call = one batch) and the statistics derived from them.

    ``times`` is the measured window in call order, ``warmup_times`` the warm-up calls,
    ``first_call`` the very first call (compilation, kernel selection, lazy init) and ``timer``
    how the device timed them (``"events"`` or ``"synchronize"``). Statistics are computed on
    demand from ``times``; they are never stored, so a round trip keeps only the raw data.
    """

    spec: TaskSpec
    times: list[float]
    warmup_times: list[float] = field(default_factory=list)
    first_call: float = 0.0
    timer: str = ""

    def __post_init__(self) -> None:
        if not self.times:
            raise ValueError("a Measurement needs at least one timed sample")

    # ---------------------------------------------------------------- statistics (seconds)

    @property
    def _array(self) -> np.ndarray:
        return np.asarray(self.times, dtype=np.float64)

    @property
    def n(self) -> int:
        return len(self.times)

    @property
    def mean(self) -> float:
        return float(self._array.mean())

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1); 0.0 for a single sample."""
        return float(self._array.std(ddof=1)) if self.n > 1 else 0.0

    @property
    def min(self) -> float:
        return float(self._array.min())

    @property
    def max(self) -> float:
        return float(self._array.max())

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100) of ``times``.

        Uses numpy's ``method="linear"`` (its default, Hyndman-Fan type 7): with the samples
        sorted as x[0..n-1], the value at rank ``(n - 1) * q / 100``, linearly interpolated
        between neighbours. E.g. for 1..100 ms, p50 = 50.5 ms and p90 = 90.1 ms.
        """
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile must be within 0..100, got {q}")
        return float(np.percentile(self._array, q, method="linear"))

    @property
    def median(self) -> float:
        return self.percentile(50)

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def p95(self) -> float:
        return self.percentile(95)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def iqr(self) -> float:
        """Interquartile range: p75 - p25."""
        return self.percentile(75) - self.percentile(25)

    @property
    def relative_iqr(self) -> float:
        """IQR / median: the spread as a fraction of the typical call (inf if median is 0)."""
        median = self.median
        return self.iqr / median if median > 0 else float("inf")

    # ---------------------------------------------------------------- throughput

    @property
    def ms_per_image(self) -> float:
        """Mean milliseconds per image (mean call time / batch size)."""
        return self.mean * 1000.0 / self.spec.batch_size

    @property
    def images_per_second(self) -> float:
        """Throughput from the mean call time: batch_size / mean."""
        return self.spec.batch_size / self.mean

    # ---------------------------------------------------------------- quality

    def warnings(self) -> list[str]:
        """Reasons to distrust these numbers, worded for a report; empty when none."""
        out: list[str] = []
        rel = self.relative_iqr
        if rel >= SPREAD_LARGE:
            out.append(
                f"spread is large: IQR is {rel:.0%} of the median; "
                "close other work or raise --min-seconds"
            )
        elif rel >= SPREAD_NOTE:
            out.append(
                f"spread is noticeable: IQR is {rel:.0%} of the median; "
                "prefer the median, and close other work for a tighter figure"
            )
        if self.n < FEW_SAMPLES:
            noun = "sample" if self.n == 1 else "samples"
            out.append(f"only {self.n} {noun}; raise --min-seconds for a stable median")
        if self.n >= 8:
            quarter = self.n // 4
            head = float(np.mean(self.times[:quarter]))
            tail = float(np.mean(self.times[-quarter:]))
            if head > 0 and abs(tail - head) / head >= DRIFT:
                way = "slower" if tail > head else "faster"
                out.append(
                    f"times drift: the last quarter of calls is {abs(tail - head) / head:.0%} "
                    f"{way} than the first (clocks, heat or caches still settling); "
                    "raise --warmup-seconds"
                )
        return out

    # ---------------------------------------------------------------- serialisation

    def summary(self) -> dict[str, float | int]:
        """The derived statistics (seconds, except the named units), for reports."""
        return {
            "n": self.n,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "median": self.median,
            "p90": self.p90,
            "p95": self.p95,
            "p99": self.p99,
            "iqr": self.iqr,
            "relative_iqr": self.relative_iqr,
            "ms_per_image": self.ms_per_image,
            "images_per_second": self.images_per_second,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: spec, raw samples and (informative only) the derived summary."""
        fields = records.insert_after(records.to_dict(self), "spec", label=self.spec.label())
        return {**fields, "summary": self.summary(), "warnings": self.warnings()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        """Rebuild from :meth:`to_dict` output; the summary is recomputed, not read."""
        return records.from_dict(
            cls, d, spec=TaskSpec.from_dict, times=_seconds, warmup_times=_seconds
        )


def _seconds(times: list[Any]) -> list[float]:
    return [float(t) for t in times]


def measure(
    fn: Callable[[], object],
    device: Device,
    spec: TaskSpec,
    *,
    warmup_iters: int = 5,
    warmup_seconds: float = 1.0,
    min_iters: int = 10,
    min_seconds: float = 2.0,
    max_iters: int = 100_000,
    max_seconds: float = 120.0,
) -> Measurement:
    """Call ``fn`` (one batch per call) repeatedly and time each call with ``device.timer()``.

    1. The first call is timed alone (``first_call``: compilation, kernel selection).
    2. Warm-up calls follow until both ``warmup_iters`` calls and ``warmup_seconds`` of timed
       work are done (the caps below apply here too).
    3. The measured window runs until both ``min_iters`` calls and ``min_seconds`` of timed
       work are done, or ``max_iters`` calls or ``max_seconds`` of wall-clock time are reached
       (it always holds at least one sample).

    Seconds of "timed work" are sums of the per-call device times; ``max_seconds`` is
    wall-clock, so overhead between calls cannot stretch the window without bound.
    """
    if min_iters < 1 or max_iters < 1:
        raise ValueError("min_iters and max_iters must be at least 1")
    if min_iters > max_iters:
        raise ValueError(f"min_iters ({min_iters}) is larger than max_iters ({max_iters})")
    if warmup_iters < 0 or min(warmup_seconds, min_seconds, max_seconds) < 0:
        raise ValueError("iteration counts and seconds must not be negative")

    method = ""

    def timed() -> float:
        nonlocal method
        with device.timer() as t:
            fn()
        method = getattr(t, "method", "")
        return float(t.seconds)

    first_call = timed()

    warmup: list[float] = []
    spent = 0.0
    start = time.perf_counter()
    while len(warmup) < warmup_iters or spent < warmup_seconds:
        if len(warmup) >= max_iters or time.perf_counter() - start >= max_seconds:
            break
        warmup.append(timed())
        spent += warmup[-1]

    times: list[float] = []
    spent = 0.0
    start = time.perf_counter()
    while True:
        times.append(timed())
        spent += times[-1]
        if len(times) >= min_iters and spent >= min_seconds:
            break
        if len(times) >= max_iters or time.perf_counter() - start >= max_seconds:
            break
    return Measurement(
        spec=spec, times=times, warmup_times=warmup, first_call=first_call, timer=method
    )
