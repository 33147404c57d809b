"""The port's own speed-up: the candidate beside the reference dtype on the same device and
batch, timed one after the other in the same run, and whether the dtype runs emulated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vitport.bench.run import BenchResult, Window, bench_batch
from vitport.device import Device, dtype_name, parse_dtype
from vitport.encoder import Encoder
from vitport.errors import VitportError, one_line
from vitport.runtimes import Setup, prepare


def speed_against_reference(
    base: Encoder,
    candidate: Encoder,
    perf: BenchResult,
    device: Device,
    reference_dtype: str,
    window: Window,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any] | None:
    """The candidate's throughput over the reference dtype's on `device` at the candidate's
    fastest batch size; the reference dtype is timed right after the candidate's bench (and
    the candidate again after it, where its fastest batch was not the last one timed). None
    when the dtypes are the same or nothing ran; {"error": ...} when the reference dtype could
    not run on the device."""
    reference = dtype_name(parse_dtype(reference_dtype))
    best = perf.best()
    if reference == perf.dtype or best is None:
        return None
    batch = best.batch_size
    progress(f"{reference} on {device} at batch {batch}, beside {perf.dtype}")
    try:
        prepared = prepare(base, Setup(dtype=reference), device)
        try:
            ref_run = bench_batch(prepared.encoder, batch, window)
        finally:
            prepared.release()
    except (VitportError, RuntimeError) as exc:
        return {"reference_dtype": reference, "error": one_line(exc, typed=True)}
    if perf.runs[-1] is best:
        ours = best.measurement
    else:  # timed again, so that both come from the same minutes
        ours = bench_batch(candidate, batch, window, Setup(perf.runtime, perf.dtype)).measurement
    ips, ref_ips = ours.images_per_second, ref_run.measurement.images_per_second
    return {
        "dtype": perf.dtype,
        "reference_dtype": reference,
        "batch_size": batch,
        "images_per_second": ips,
        "reference_images_per_second": ref_ips,
        "ratio": ips / ref_ips,
        "emulated": perf.emulated,
        "peak_tflops": perf.peak.tflops if perf.peak else None,
        "fp32_peak_tflops": perf.fp32_peak.tflops if perf.fp32_peak else None,
    }
