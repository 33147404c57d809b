"""Cost of `compare --reference FILE --localize` against a golden file with block states, in
forward passes and seconds, for the demo model on the CPU; beside it, the in-process
localisation that needs the reference model in the same process.

Writes its section of docs/benchmarks.md. Run: python benchmarks/golden_localize.py
"""

from __future__ import annotations

import datetime
import statistics
import tempfile
import time
from pathlib import Path

import torch
from docs_section import write_section

import vitport
from vitport.compare.localize import localize, localize_golden
from vitport.faults import inject
from vitport.golden import GoldenBlocks, golden_file_parts
from vitport.infer import infer
from vitport.inputs import default_inputs

MARK = "<!-- golden_localize -->"
REPEATS = 3


def timed(run) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    base = vitport.load("demo:dinov2-small", "cpu", "fp32")
    images = default_inputs()
    batches = [base.preprocess([im.image for im in images[i : i + 2]]) for i in range(0, 10, 2)]
    folder = Path(tempfile.mkdtemp())
    extra, header = golden_file_parts(base, images, 2, fp32=False, max_bytes=int(2e9))
    features = infer(base, images, 2).features
    path = features.save(folder / "golden.safetensors", extra, header)
    golden = GoldenBlocks.open(path)
    candidate = base.to(base.device, base.dtype)
    inject(candidate, "gelu-tanh@7")

    def forward() -> None:
        with torch.inference_mode():
            for pixels in batches:
                candidate.forward_fn(candidate.module, pixels)

    plain = timed(forward)
    blocks_only = timed(lambda: localize_golden(candidate, golden, batches))
    with_parts = timed(lambda: localize_golden(candidate, golden, batches, part_reference=base))
    in_process = timed(lambda: localize(candidate, base, batches))
    culprit = localize_golden(candidate, golden, batches, part_reference=base).culprit
    rows = [
        ("plain forward of the 10 default inputs (batch 2)", plain),
        ("golden file: accumulated + every block teacher-forced", blocks_only),
        ("golden file, and the culprit block's parts against CPU fp32", with_parts),
        ("in-process reference (today's --localize, reference model here)", in_process),
    ]
    lines = [
        f"## CPU: localising against a golden file with block states ({datetime.date.today()})",
        "",
        f"Machine: {base.device.describe().get('name')}, torch {torch.__version__}. Command: "
        "`python benchmarks/golden_localize.py`. demo:dinov2-small fp32, 10 default inputs in "
        f"batches of 2, a tanh GELU planted in block 7; median of {REPEATS} runs each. Golden "
        f"file: {path.stat().st_size / 1e6:.0f} MB (13 hook points, fp32). Culprit named: "
        f"`{culprit}`.",
        "",
        "| run | seconds | forwards |",
        "| --- | ---: | ---: |",
        *(f"| {label} | {seconds:.2f} | {seconds / plain:.2f} |" for label, seconds in rows),
        "",
        "Reading the block states from the file is included; they are read a slice at a time.",
    ]
    print(write_section(MARK, lines))


if __name__ == "__main__":
    main()
