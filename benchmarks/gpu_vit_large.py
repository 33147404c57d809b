"""Target: on a GPU, ViT-L/14 at 224 in bf16 through vitport is at or above a timm
benchmark.py-style loop with torch.compile measured in the same run, and MFU >= 50%.

Weights do not change speed, so the model is built from its architecture with random weights
(timm `vit_large_patch14_dinov2`, 224 px). Writes its section of docs/benchmarks.md.
Run: python benchmarks/gpu_vit_large.py [--smoke]   (--smoke: tiny model on the CPU, to check
the script itself)
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time

import timm
import torch
from docs_section import write_section
from timm.models._hub import save_for_hf

import vitport
from vitport.bench.run import Window, bench
from vitport.compare.run import features_of
from vitport.compare.verdict import judge_features, thresholds_for
from vitport.device import resolve_device
from vitport.inputs import default_inputs
from vitport.runtimes import RUNNERS, Setup, prepare, runner

MARK = "<!-- gpu_vit_large -->"


def timm_style(model_name: str, args: dict, device: torch.device, batch: int, steps: int = 40):
    """timm benchmark.py's method: 10 warm-up + `steps` timed steps, synchronised at the edges."""
    model = timm.create_model(model_name, **args).to(device=device, dtype=torch.bfloat16).eval()
    model = torch.compile(model)
    x = torch.randn(
        batch, 3, args["img_size"], args["img_size"], device=device, dtype=torch.bfloat16
    )
    with torch.inference_mode():
        for _ in range(10):
            model(x)
        torch.accelerator.synchronize() if device.type != "cpu" else None
        start = time.perf_counter()
        for _ in range(steps):
            model(x)
        torch.accelerator.synchronize() if device.type != "cpu" else None
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batch-sizes", default="64,128,256")
    opts = parser.parse_args()
    device = resolve_device("cpu" if opts.smoke else "cuda")
    name = "vit_large_patch14_dinov2"
    args = {"img_size": 224, "num_classes": 0}
    if opts.smoke:
        args.update(embed_dim=64, depth=2, num_heads=2)
    sizes = [2] if opts.smoke else [int(b) for b in opts.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        save_for_hf(timm.create_model(name, **args), tmp, model_args=args)
        setup = Setup("compile", "bf16", "sdpa")
        encoder = prepare(vitport.load(tmp, device=str(device), dtype="bf16"), setup).encoder
    window = Window(
        min_seconds=0.5 if opts.smoke else 5.0, warmup_seconds=0.5 if opts.smoke else 5.0
    )
    ours = bench(encoder, sizes, window, setup=setup)
    lines = [
        MARK,
        f"## GPU: ViT-L/14 @224 bf16 vs timm-style loop ({datetime.date.today()})",
        "",
        f"Device: {ours.device_description.get('name')}. Command: "
        f"`python benchmarks/gpu_vit_large.py{' --smoke' if opts.smoke else ''}`.",
        "",
        "| batch | vitport img/s | timm-style img/s | MFU (measured peak) | MFU (vendor) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for run, row in zip(ours.runs, ours.rows(), strict=True):
        theirs = timm_style(name, args, device.torch_device, run.batch_size)
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        vendor = f"{100 * row['vendor_mfu']:.1f}%" if row["vendor_mfu"] is not None else "n/a"
        lines.append(
            f"| {run.batch_size} | {row['images_per_second']:.1f} | {theirs:.1f} | "
            f"{mfu} | {vendor} |"
        )
    lines += [
        "",
        "Runtimes at bf16 (each built from the fp32 model, checked against CPU fp32 with "
        "the bf16 limits, timed with the same timer):",
        "",
        "| runtime | " + " | ".join(f"img/s bs{b}" for b in sizes) + " | verdict | build s |",
        "| --- | " + " | ".join("---:" for _ in sizes) + " | --- | ---: |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        save_for_hf(timm.create_model(name, **args), tmp, model_args=args)
        fp32 = vitport.load(tmp, device=str(device), dtype="fp32")
    reference = features_of(fp32.to(resolve_device("cpu")), default_inputs()[:4], 2)
    for runtime in RUNNERS.names():
        kind = runner(runtime)
        if kind.not_applicable(device.type, "bf16") or kind.missing():
            continue
        taken = [b for b in sizes if kind.limits.cap(b) == b]  # within the runtime's limits
        try:
            built = prepare(fp32, Setup(runtime, "bf16"), device)
            judged = judge_features(
                reference.groups(),
                features_of(built.encoder, default_inputs()[:4], 2).groups(),
                thresholds_for("bf16"),
            )
            runs = {
                r["batch_size"]: r
                for r in bench(built.encoder, taken, window, measure_roofline=False).rows()
            }
            speeds = " | ".join(
                f"{runs[b]['images_per_second']:.1f}" if b in runs else "-" for b in sizes
            )
            lines.append(
                f"| {runtime} | {speeds} | {'PASS' if judged else 'FAIL'} | "
                f"{built.build_seconds:.1f} |"
            )
        except Exception as exc:  # one row, and the table goes on
            reason = (
                str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
            )
            lines.append(f"| {runtime} | could not run: {reason} |")
    section = "\n".join(lines[1:]) + "\n"
    if not opts.smoke:
        section = write_section(MARK, lines[1:])
    print(section)


if __name__ == "__main__":
    main()
