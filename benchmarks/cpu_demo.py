"""Target: on this CPU, the fastest faithful configuration of demo:dinov2-small is at least 2x
plain transformers fp32 (attention as loaded, no torch.compile) at the same batch size.

Writes its section of docs/benchmarks.md. Run: python benchmarks/cpu_demo.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import platform

from docs_section import write_section

import vitport
from vitport.bench.optimize import optimize
from vitport.bench.run import Window
from vitport.device import resolve_device
from vitport.inputs import default_inputs

MARK = "<!-- cpu_demo -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short windows, no torch.compile")
    parser.add_argument("--batch-sizes", default="1,8")
    args = parser.parse_args()
    window = Window(
        min_seconds=1.0 if args.quick else 5.0, warmup_seconds=1.0 if args.quick else 3.0
    )
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    device = resolve_device("cpu")
    base = vitport.load("demo:dinov2-small")
    result = optimize(
        base,
        device,
        default_inputs(),
        sizes,
        window,
        dtypes=("fp32", "bf16"),
        attentions=("default", "eager", "sdpa"),
        compile_options=(False,) if args.quick else (False, True),
        progress=lambda m: print(m, flush=True),
    )
    best = result.best()
    speedup = result.speedup()
    lines = [
        MARK,
        f"## CPU: demo:dinov2-small, fastest faithful configuration ({datetime.date.today()})",
        "",
        f"Machine: {device.describe().get('name', platform.processor())}, "
        f"torch {device.describe().get('torch')}. Command: `python benchmarks/cpu_demo.py"
        f"{' --quick' if args.quick else ''}`. Faithful = passes `vitport compare` against CPU "
        "fp32 at the dtype's default thresholds on the 10 default inputs. Baseline = plain "
        "transformers fp32, attention as loaded, no torch.compile.",
        "",
        "| configuration | faithful | worst rel err | "
        + " | ".join(f"img/s bs{b}" for b in sizes)
        + " |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in sizes) + " |",
    ]
    for trial in result.trials:
        speeds = [f"{trial.speed(b):.1f}" if trial.speed(b) else "-" for b in sizes]
        err = f"{100 * trial.worst_rel_error:.3g}%" if trial.worst_rel_error is not None else "-"
        faithful = {True: "yes", False: "no", None: "error"}[trial.faithful]
        lines.append(f"| {trial.label()} | {faithful} | {err} | " + " | ".join(speeds) + " |")
    lines.append("")
    if best is not None:
        trial, batch = best
        verdict = "met" if speedup and speedup >= 2 else "MISSED"
        ratio = f"{speedup:.2f}x the baseline" if speedup else "no speed-up given"
        lines.append(
            f"Fastest faithful: **{trial.label()} at batch {batch}, "
            f"{trial.speed(batch):.1f} img/s, {ratio}** (target 2x: {verdict})."
        )
        if result.drift():
            lines.append(f"Note: {result.drift()}.")
    print(write_section(MARK, lines[1:]))


if __name__ == "__main__":
    main()
