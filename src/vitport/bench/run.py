"""`bench`: latency and throughput by batch size, on the device itself, against the roofline."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vitport import records
from vitport.bench.flops import FlopCount, flops_per_image
from vitport.bench.peak import (
    PeakResult,
    emulated,
    emulation_note,
    measure_peak,
    peak_dtype_key,
    vendor_peak,
)
from vitport.bench.timing import Measurement, TaskSpec, measure
from vitport.device import dtype_name
from vitport.encoder import Encoder
from vitport.errors import OutOfMemoryError
from vitport.format import share
from vitport.runtimes.base import Setup, runner

SCHEMA_VERSION = 1
AUTO_MAX_BATCH = 1024
AUTO_PATIENCE = 2  # doublings without a throughput gain before auto stops
AUTO_MIN_GAIN = 0.03
CSV_COLUMNS = [
    "model",
    "infer_img_size",
    "infer_samples_per_sec",
    "infer_step_time",
    "infer_batch_size",
    "param_count",
    "infer_gmacs",
    "infer_device",
    "infer_dtype",
]  # timm benchmark.py's names
MARKDOWN_HEAD = (
    "| batch | p50 ms | p90 ms | p99 ms | mean ± std ms | ms/img | img/s | TFLOP/s | MFU |"
)


@dataclass(frozen=True)
class Window:
    """How long to warm up and measure each configuration."""

    warmup_iters: int = 5
    warmup_seconds: float = 1.0
    min_iters: int = 10
    min_seconds: float = 2.0

    def kwargs(self) -> dict[str, float]:
        return {
            "warmup_iters": self.warmup_iters,
            "warmup_seconds": self.warmup_seconds,
            "min_iters": self.min_iters,
            "min_seconds": self.min_seconds,
        }


@dataclass
class BatchRun:
    """One batch size: its timing, its memory, and what the roofline makes of it."""

    measurement: Measurement
    peak_memory: int | None

    @property
    def batch_size(self) -> int:
        return self.measurement.spec.batch_size


@dataclass
class BenchResult:
    spec: str
    device: str
    dtype: str
    attention: str
    compiled: bool
    fixes: list[str]
    image_size: tuple[int, int]
    params: int
    flops: FlopCount
    peak: PeakResult | None
    vendor_tflops: float | None
    device_description: dict[str, str]
    load_seconds: float
    runs: list[BatchRun] = field(default_factory=list)
    oom_batch: int | None = None  # the first batch size that ran out of memory, if any
    auto: bool = False
    notes: list[str] = field(default_factory=list)
    runtime: str = "torch"
    fp32_peak: PeakResult | None = None  # beside another dtype's peak: is that dtype emulated?

    @property
    def emulated(self) -> bool:
        """This dtype's measured matmul peak is below fp32's: it runs emulated here."""
        return bool(self.peak and self.fp32_peak) and emulated(
            self.dtype, self.peak.tflops, self.fp32_peak.tflops
        )

    def achieved_tflops(self, run: BatchRun) -> float:
        return self.flops.total * run.measurement.images_per_second / 1e12

    def mfu(self, run: BatchRun) -> float | None:
        """Achieved over the measured peak; None without a peak, or when the model outran it
        (then the peak measurement is no ceiling, and a note says so)."""
        if not self.peak:
            return None
        share = self.achieved_tflops(run) / self.peak.tflops
        return share if share <= 1.0 else None

    def vendor_mfu(self, run: BatchRun) -> float | None:
        return self.achieved_tflops(run) / self.vendor_tflops if self.vendor_tflops else None

    def best(self) -> BatchRun | None:
        return max(self.runs, key=lambda r: r.measurement.images_per_second, default=None)

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per batch size: every statistic the tables and CSV show."""
        rows = []
        for run in self.runs:
            m = run.measurement
            rows.append(
                {
                    "batch_size": run.batch_size,
                    "samples": len(m.times),
                    "mean_ms": 1000 * m.mean,
                    "std_ms": 1000 * m.std,
                    "min_ms": 1000 * m.min,
                    "max_ms": 1000 * m.max,
                    "p50_ms": 1000 * m.median,
                    "p90_ms": 1000 * m.p90,
                    "p95_ms": 1000 * m.p95,
                    "p99_ms": 1000 * m.p99,
                    "ms_per_image": m.ms_per_image,
                    "images_per_second": m.images_per_second,
                    "first_call_ms": 1000 * m.first_call,
                    "achieved_tflops": self.achieved_tflops(run),
                    "mfu": self.mfu(run),
                    "vendor_mfu": self.vendor_mfu(run),
                    "peak_memory_bytes": run.peak_memory,
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        fields = records.insert_after(records.to_dict(self), "runs", rows=self.rows())
        return {"schema_version": SCHEMA_VERSION, **fields}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchResult:
        def run(r: dict[str, Any]) -> BatchRun:
            return records.from_dict(BatchRun, r, measurement=Measurement.from_dict)

        return records.from_dict(
            cls,
            data,
            flops=lambda f: records.from_dict(FlopCount, f),
            peak=lambda p: records.from_dict(PeakResult, p) if p else None,
            fp32_peak=lambda p: records.from_dict(PeakResult, p) if p else None,
            runs=lambda rs: [run(r) for r in rs],
        )

    def to_csv(self) -> str:
        """One row per batch size with timm benchmark.py's column names."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for run in self.runs:
            m = run.measurement
            writer.writerow(
                {
                    "model": self.spec,
                    "infer_img_size": self.image_size[0],
                    "infer_samples_per_sec": round(m.images_per_second, 2),
                    "infer_step_time": round(1000 * m.mean, 3),
                    "infer_batch_size": run.batch_size,
                    "param_count": round(self.params / 1e6, 2),
                    "infer_gmacs": round(self.flops.gmacs, 2),
                    "infer_device": self.device,
                    "infer_dtype": self.dtype,
                }
            )
        return out.getvalue()

    def to_markdown(self) -> str:
        head = (
            MARKDOWN_HEAD + "\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        )
        lines = []
        for row in self.rows():
            mfu = share(row["mfu"])
            lines.append(
                f"| {row['batch_size']} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | "
                f"{row['p99_ms']:.2f} | {row['mean_ms']:.2f} ± {row['std_ms']:.2f} | "
                f"{row['ms_per_image']:.2f} | {row['images_per_second']:.1f} | "
                f"{row['achieved_tflops']:.3f} | {mfu} |"
            )
        return head + "\n".join(lines) + "\n"


def random_pixels(encoder: Encoder, batch_size: int, seed: int = 0) -> torch.Tensor:
    """Synthetic input on the device, as timm's benchmark uses: preprocessing is --e2e's job."""
    generator = torch.Generator().manual_seed(seed)
    height, width = encoder.image_size
    with torch.inference_mode():  # the same kind of tensor encode() makes: no recompile
        pixels = torch.randn(batch_size, 3, height, width, generator=generator)
        return pixels.to(device=encoder.device.torch_device, dtype=encoder.dtype)


def setup_of(encoder: Encoder) -> Setup:
    """The Setup an encoder shows by itself: its runtime, dtype and fixes (attention as
    loaded). Give bench the Setup that prepared it to record its attention too."""
    return Setup(encoder.runtime, dtype_name(encoder.dtype), fixes=tuple(encoder.fixes))


def task_spec(encoder: Encoder, batch_size: int, setup: Setup | None = None) -> TaskSpec:
    return TaskSpec(
        model=encoder.spec,
        device=str(encoder.device),
        batch_size=batch_size,
        image_size=tuple(encoder.image_size),
        setup=setup or setup_of(encoder),
    )


def bench_batch(
    encoder: Encoder, batch_size: int, window: Window, setup: Setup | None = None
) -> BatchRun:
    """Time one batch size; raises OutOfMemoryError when the device runs out, and LimitError
    (before running) for a batch size beyond what the encoder's runtime takes."""
    setup = setup or setup_of(encoder)
    runner(setup.runtime).limits.check_batch(setup.runtime, batch_size)
    device = encoder.device
    device.empty_cache()
    device.reset_peak_memory()
    pixels = random_pixels(encoder, batch_size)

    def call() -> object:
        return encoder.encode(pixels)

    measurement = measure(call, device, task_spec(encoder, batch_size, setup), **window.kwargs())
    return BatchRun(measurement, device.peak_memory())


def sweep(
    encoder: Encoder,
    batch_sizes: Sequence[int] | None,
    window: Window,
    *,
    setup: Setup | None = None,
    progress: Callable[[str], None] = lambda _: None,
    max_batch: int = AUTO_MAX_BATCH,
) -> tuple[list[BatchRun], int | None]:
    """Each batch size in turn, or (None) doubling from 1 until out of memory, no gain or past
    max_batch (or the largest batch the encoder's runtime takes, where that is smaller). Given
    sizes beyond the runtime's limits are refused before any runs.

    Returns the runs and the first batch size that ran out of memory (None if none did).
    """
    setup = setup or setup_of(encoder)
    limits = runner(setup.runtime).limits
    limits.check_batches(setup.runtime, batch_sizes)
    max_batch = limits.cap(max_batch)
    runs: list[BatchRun] = []
    auto = batch_sizes is None
    sizes = iter(batch_sizes or [])
    batch, best, stale = 1, 0.0, 0
    while True:
        batch = batch if auto else next(sizes, None)
        if batch is None or (auto and batch > max_batch):
            return runs, None
        last = runs[-1] if runs else None
        measured = (
            f" (batch {last.batch_size}: {last.measurement.images_per_second:.1f} img/s)"
            if last
            else ""
        )
        progress(f"batch {batch}{measured}")
        try:
            run = bench_batch(encoder, batch, window, setup)
        except OutOfMemoryError:
            encoder.device.empty_cache()
            if not runs:
                raise
            return runs, batch  # back off: the runs so far stand, this size does not fit
        runs.append(run)
        if auto:
            speed = run.measurement.images_per_second
            stale = 0 if speed > best * (1 + AUTO_MIN_GAIN) else stale + 1
            best = max(best, speed)
            if stale >= AUTO_PATIENCE:
                return runs, None
            batch *= 2


def bench(
    encoder: Encoder,
    batch_sizes: Sequence[int] | None,
    window: Window = Window(),
    *,
    setup: Setup | None = None,
    measure_roofline: bool = True,
    progress: Callable[[str], None] = lambda _: None,
) -> BenchResult:
    """Latency and throughput by batch size, FLOPs, achieved TFLOP/s and MFU. `setup` is how
    `encoder` was prepared (see vitport.runtimes.prepare; default: what the encoder shows)."""
    setup = setup or setup_of(encoder)
    runner(setup.runtime).limits.check_batches(setup.runtime, batch_sizes)
    flops = flops_per_image(encoder.arch, encoder.image_size, encoder.layout.num_prefix)
    description = encoder.device.describe()
    result = BenchResult(
        spec=encoder.spec,
        device=str(encoder.device),
        dtype=dtype_name(encoder.dtype),
        attention=setup.attention,
        compiled=setup.compiled,
        fixes=list(encoder.fixes),
        image_size=tuple(encoder.image_size),
        params=encoder.num_params,
        flops=flops,
        peak=None,
        vendor_tflops=vendor_peak(description.get("name", ""), peak_dtype_key(encoder.dtype)),
        device_description=description,
        load_seconds=encoder.load_seconds,
        auto=batch_sizes is None,
        runtime=setup.runtime,
    )
    result.runs, result.oom_batch = sweep(
        encoder, batch_sizes, window, setup=setup, progress=progress
    )
    if measure_roofline:
        progress("peak: a large matmul on the device")
        result.peak = measure_peak(encoder.device, encoder.dtype)
        if result.dtype != "fp32":
            result.fp32_peak = measure_peak(encoder.device, torch.float32)
            note = emulation_note(result.dtype, result.peak.tflops, result.fp32_peak.tflops)
            result.notes += [note] if note else []
    fastest = result.best()
    if result.peak and fastest and result.achieved_tflops(fastest) > result.peak.tflops:
        result.notes.append(
            f"MFU not shown: the model ran at {result.achieved_tflops(fastest):.4g} TFLOP/s, "
            f"faster than the measured matmul peak ({result.peak.tflops:.4g} TFLOP/s), so that "
            "peak is no ceiling (a busy or throttled device while it was measured?)"
        )
    if result.oom_batch is not None:
        result.notes.append(
            f"batch {result.oom_batch} ran out of memory; the sizes after it were not tried "
            f"(largest that ran: {max(r.batch_size for r in result.runs)})"
        )
    if (
        result.runs
        and result.runs[0].measurement.first_call > 10 * result.runs[0].measurement.median
    ):
        first = result.runs[0].measurement
        result.notes.append(
            f"the first call took {1000 * first.first_call:.0f} ms against a median of "
            f"{1000 * first.median:.1f} ms: kernel build or compilation, paid once per process"
        )
    for run in result.runs:
        result.notes.extend(f"batch {run.batch_size}: {w}" for w in run.measurement.warnings())
    return result


@dataclass(frozen=True)
class Regression:
    batch_size: int
    old_images_per_second: float
    new_images_per_second: float
    noise: float  # relative run-to-run noise allowed

    @property
    def change(self) -> float:
        return self.new_images_per_second / self.old_images_per_second - 1


def regressions(old: BenchResult, new: BenchResult, min_noise: float = 0.02) -> list[Regression]:
    """Batch sizes whose throughput fell by more than the run-to-run noise of either run.

    Noise is the larger relative IQR of the two runs' latency samples (at least `min_noise`).
    """
    before = {r.batch_size: r.measurement for r in old.runs}
    found = []
    for run in new.runs:
        then = before.get(run.batch_size)
        if then is None:
            continue
        now = run.measurement
        noise = max(then.relative_iqr, now.relative_iqr, min_noise)
        change = now.images_per_second / then.images_per_second - 1
        if change < -noise and not math.isclose(change, 0.0):
            found.append(
                Regression(run.batch_size, then.images_per_second, now.images_per_second, noise)
            )
    return found
