"""Dump a model with the real msprobe, as an Ascend user does: PrecisionDebugger around the
forward calls, one forward per batch. The tests and benchmarks/msprobe_vs_vitport.py run it in
a subprocess (msprobe's debugger is one per process).

Run: python benchmarks/msprobe_dump.py --model SPEC --out DIR [--dtype bf16] [--level L0|mix|L1]
     [--task tensor|statistics] [--fault gelu-tanh@3] [--images 4] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--level", default="L0")
    parser.add_argument("--task", default="tensor")
    parser.add_argument("--fault", default="")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()

    from msprobe.pytorch import PrecisionDebugger

    import vitport
    from vitport.faults import inject
    from vitport.inputs import sample_images

    encoder = vitport.load(args.model, "cpu", args.dtype)
    if args.fault:
        inject(encoder, args.fault)
    config = {
        "task": args.task,
        "dump_path": str(Path(args.out).resolve()),
        "rank": [],
        "step": [],
        "level": args.level,
        args.task: {"scope": [], "list": [], "data_mode": ["all"]},
    }
    config_path = Path(tempfile.mkdtemp()) / "config.json"
    config_path.write_text(json.dumps(config))
    debugger = PrecisionDebugger(config_path=str(config_path))
    images = sample_images(args.images)
    debugger.start(model=encoder.module)
    with torch.no_grad():
        for start in range(0, len(images), args.batch_size):
            chunk = images[start : start + args.batch_size]
            pixels = encoder.preprocess([im.image for im in chunk]).to(encoder.dtype)
            encoder.forward_fn(encoder.module, pixels)
    debugger.stop()
    debugger.step()


if __name__ == "__main__":
    main()
