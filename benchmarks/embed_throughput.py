"""Target: `vitport embed` end to end (decode, preprocess, model, Parquet) reaches at least 90% of
`vitport bench`'s model-only throughput at the same batch size, dtype and device: the demo
model in fp32 on the CPU.

Writes its section of docs/benchmarks.md. Run: python benchmarks/embed_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import tempfile
from pathlib import Path

from docs_section import write_section

import vitport
from vitport.bench.run import Window, bench_batch
from vitport.embed import embed
from vitport.inputs import sample_images

MARK = "<!-- embed_throughput -->"


def photo_folder(root: Path, copies: int) -> int:
    """The 8 scikit-image photos (256 to 512 px a side) as JPEGs, `copies` times."""
    count = 0
    for copy in range(copies):
        folder = root / f"c{copy:03d}"
        folder.mkdir(parents=True)
        for image in sample_images(8):
            image.image.save(folder / f"{image.name.removeprefix('skimage:')}.jpg", quality=90)
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer images, shorter windows")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", default="1,2", help="DataLoader workers to try")
    args = parser.parse_args()
    copies = 4 if args.quick else 16
    window = Window(min_seconds=2.0 if args.quick else 8.0, warmup_seconds=1.0)
    encoder = vitport.load("demo:dinov2-small", "cpu", "fp32")
    model_only = bench_batch(encoder, args.batch_size, window).measurement.images_per_second
    rows = []
    root = Path(tempfile.mkdtemp())
    try:
        images = photo_folder(root / "photos", copies)
        for workers in (int(w) for w in args.workers.split(",")):
            out = root / f"out-{workers}"
            summary = embed(
                [str(root / "photos")],
                encoder,
                out,
                batch_size=args.batch_size,
                workers=workers,
                shard_size=64,
            )
            rows.append((workers, summary))
            print(
                f"workers {workers}: {summary.images_per_second:.2f} img/s "
                f"({summary.bottleneck()})",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best_workers, best = max(rows, key=lambda r: r[1].images_per_second)
    ratio = best.images_per_second / model_only
    lines = [
        MARK,
        f"## CPU: embed end to end vs the model alone ({datetime.date.today()})",
        "",
        f"Machine: {encoder.device.describe().get('name')}, torch "
        f"{encoder.device.describe().get('torch')}. Command: `python "
        f"benchmarks/embed_throughput.py{' --quick' if args.quick else ''}`. demo:dinov2-small, "
        f"fp32, batch {args.batch_size}, {images} JPEG photos (256-512 px) decoded, "
        "preprocessed (resize 256, crop 224), embedded and written as Parquet (cls, pooled). "
        "Model-only = `vitport bench`'s timing of the same encoder on random pixels.",
        "",
        "| run | img/s | share of model-only | bottleneck |",
        "| --- | ---: | ---: | --- |",
        f"| model only (bench) | {model_only:.2f} | 100% | - |",
    ]
    for workers, summary in rows:
        lines.append(
            f"| embed, {workers} workers | {summary.images_per_second:.2f} | "
            f"{100 * summary.images_per_second / model_only:.0f}% | {summary.bottleneck()} |"
        )
    verdict = "met" if ratio >= 0.9 else "not met"
    lines += [
        "",
        f"Best: **{best_workers} workers, {best.images_per_second:.2f} img/s, "
        f"{100 * ratio:.0f}% of model-only** (target 90%: {verdict}).",
    ]
    print(write_section(MARK, lines[1:]))


if __name__ == "__main__":
    main()
