"""Runtimes side by side on this machine's CPU, and what the default `bench --optimize` picks.

1. The table: demo:dinov2-small at batch 1 and 8, torch eager fp32 and bf16, torch.compile
   fp32, onnxruntime fp32, OpenVINO f32 and bf16 (asked for by INFERENCE_PRECISION_HINT), each
   checked against CPU fp32 with the dtype's limits and timed with the same synchronised timer
   (one `optimize` run over exactly those configurations, no budget).
2. The default search, as a newcomer runs `vitport bench --optimize`: every runtime installed,
   fp32/bf16/fp16, the attention settings, compile, and the 10-minute default budget; its wall
   time and its choice, set against the fastest faithful row of the table.

Writes its section of docs/benchmarks.md. Run: python benchmarks/runtimes_cpu.py
"""

from __future__ import annotations

import datetime
import time

import torch
from docs_section import write_section

import vitport
from vitport.bench.configure import DEFAULT_BUDGET
from vitport.bench.optimize import optimize
from vitport.bench.run import Window
from vitport.device import resolve_device
from vitport.format import pct
from vitport.inputs import default_inputs
from vitport.runtimes import Setup

MARK = "<!-- runtimes_cpu -->"
SIZES = [1, 8]
TABLE = [
    Setup("torch", "fp32"),
    Setup("torch", "bf16"),
    Setup("compile", "fp32"),
    Setup("onnxruntime", "fp32"),
    Setup("openvino", "fp32"),
    Setup("openvino", "bf16"),
]


def _same_in_search(search, fastest) -> str:
    """The search's own measurement of the table's fastest row: within one run, the choice is
    the fastest faithful by construction; across the two runs the gap is noise."""
    if not fastest:
        return ""
    again = next((t for t in search.trials if t.config == fastest[0].config), None)
    if again is None or not again.speed(fastest[1]):
        return f"The search did not time {fastest[0].config.label()} at batch {fastest[1]}."
    return (
        f"In the search's own run, {fastest[0].config.label()} at batch {fastest[1]} measured "
        f"{again.speed(fastest[1]):.1f} img/s (the table's run: {fastest[0].speed(fastest[1]):.1f})."
    )


def main() -> None:
    base = vitport.load("demo:dinov2-small", "cpu", "fp32")
    cpu = resolve_device("cpu")
    images = default_inputs()
    window = Window()
    began = time.perf_counter()
    table = optimize(
        base,
        cpu,
        images,
        SIZES,
        window,
        dtypes=("fp32", "bf16"),
        attentions=("default",),
        compile_options=(False, True),
        runtimes=("torch", "compile", "onnxruntime", "openvino"),
        budget=None,
        progress=print,
    )
    table_seconds = time.perf_counter() - began
    trials = {t.config: t for t in table.trials}
    eager = trials[TABLE[0]]
    rows = [
        "| configuration | img/s bs1 | img/s bs8 | x torch fp32 (bs8) | verdict | worst rel err | build s |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for config in TABLE:
        t = trials.get(config)
        if t is None:
            rows.append(f"| {config.label()} | - | - | - | not tried | - | - |")
            continue
        speeds = [t.speed(b) for b in SIZES]
        ratio = (speeds[1] / eager.speed(8)) if speeds[1] and eager.speed(8) else None
        verdict = (
            "could not run: " + t.error
            if t.faithful is None
            else ("PASS" if t.faithful else "FAIL")
        )
        rows.append(
            f"| {config.label()} | {speeds[0] or 0:.1f} | {speeds[1] or 0:.1f} | "
            f"{f'{ratio:.2f}x' if ratio else '-'} | {verdict} | "
            f"{pct(t.worst_rel_error) if t.worst_rel_error is not None else '-'} | {t.build_seconds:.1f} |"
        )
    fastest = table.best()

    began = time.perf_counter()
    search = optimize(base, cpu, images, SIZES, window, budget=DEFAULT_BUDGET, progress=print)
    search_seconds = time.perf_counter() - began
    chosen = search.best()
    lines = [
        f"## CPU: runtimes side by side, and the default search ({datetime.date.today()})",
        "",
        f"Command: `python benchmarks/runtimes_cpu.py`. torch {torch.__version__}, "
        f"{cpu.describe().get('name')}, 2 cores; demo:dinov2-small, 224x224, the 10 default "
        f"inputs for the verdict (against CPU fp32, the dtype's limits). One run of {table_seconds:.0f} s "
        "for the table; build s is the build (export, compile) plus the first calls. ONNX exports "
        "are cached per weights, fixes and image size (~/.cache/vitport/runtimes), so a row's "
        "build s is a cache hit where an earlier run exported the same model.",
        "",
        *rows,
        "",
        f"Fastest faithful in the table: {fastest[0].config.label()} at batch {fastest[1]}, "
        f"{fastest[0].speed(fastest[1]):.1f} img/s."
        if fastest
        else "No faithful row.",
        "",
        f"The default `vitport bench --optimize` (every runtime installed, budget "
        f"{DEFAULT_BUDGET / 60:.0f} min): {search_seconds / 60:.1f} min, "
        f"{len(search.trials)} configurations tried, {len(search.skipped)} left for the budget"
        + (f" ({', '.join(search.skipped)})" if search.skipped else "")
        + f"; runtimes skipped: {'; '.join(search.runtimes_skipped) or 'none'}.",
        f"It chose {chosen[0].config.label()} at batch {chosen[1]}: {chosen[0].speed(chosen[1]):.1f} "
        f"img/s ({'PASS' if chosen[0].faithful else 'FAIL'}), "
        + (
            f"{chosen[0].speed(chosen[1]) / fastest[0].speed(fastest[1]):.2f}x the table's fastest "
            "faithful row (two separate measurements: the ratio carries their run-to-run noise)."
            if fastest
            else "."
        )
        if chosen
        else "It found no faithful configuration.",
        _same_in_search(search, fastest),
    ]
    print(write_section(MARK, lines))


if __name__ == "__main__":
    main()
