"""Rich tables of speed: bench by batch size, the --optimize search, end to end from files."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from vitport.format import count, gib, pct_column, share


def bench_table(result) -> Table:
    """The seeds' performance table: per batch size latency percentiles, img/s, roofline."""
    table = Table(
        title=(
            f"{escape(result.spec)} on {result.device} ({result.dtype}, "
            + (
                f"runtime {result.runtime}"
                if result.runtime != "torch"
                else f"attention {result.attention}{', compiled' if result.compiled else ''}"
            )
            + "), "
            f"{result.image_size[0]}x{result.image_size[1]}"
        )
    )
    for column in (
        "batch",
        "p50 ms",
        "p90 ms",
        "p95 ms",
        "p99 ms",
        "mean ± std ms",
        "ms/img",
        "img/s",
        "TFLOP/s",
        "MFU",
        "MFU vendor",
        "peak mem",
        "samples",
    ):
        table.add_column(column, justify="right")
    best = result.best()
    for row in result.rows():
        style = "bold" if best is not None and row["batch_size"] == best.batch_size else None
        table.add_row(
            str(row["batch_size"]),
            f"{row['p50_ms']:.2f}",
            f"{row['p90_ms']:.2f}",
            f"{row['p95_ms']:.2f}",
            f"{row['p99_ms']:.2f}",
            f"{row['mean_ms']:.2f} ± {row['std_ms']:.2f}",
            f"{row['ms_per_image']:.2f}",
            f"{row['images_per_second']:.1f}",
            f"{row['achieved_tflops']:.3f}",
            share(row["mfu"]),
            share(row["vendor_mfu"]),
            gib(row["peak_memory_bytes"]),
            str(row["samples"]),
            style=style,
        )
    return table


def optimize_table(result) -> Table:
    table = Table(title="configurations tried (faithful = passes compare against CPU fp32)")
    table.add_column("configuration")
    table.add_column("faithful")
    table.add_column("worst rel err (%)", justify="right")
    table.add_column("build s", justify="right")
    for batch in result.batch_sizes:
        table.add_column(f"img/s bs{batch}", justify="right")
    best = result.best()
    errors = pct_column([t.worst_rel_error for t in result.trials])
    for trial, error in zip(result.trials, errors, strict=True):
        faithful = {True: "yes", False: "no", None: "could not run"}[trial.faithful]
        if trial.faithful is False and trial.failed_checks:
            faithful += f" ({trial.failed_checks[0]})"
        if trial.error:
            faithful = f"could not run: {trial.error[:60]}"
        elif trial.note:
            faithful += f" ({trial.note})"
        speeds = [
            f"{trial.speed(b):.1f}" if trial.speed(b) is not None else "-"
            for b in result.batch_sizes
        ]
        style = "bold green" if best is not None and trial is best[0] else None
        table.add_row(
            trial.label(),
            faithful,
            "-" if trial.worst_rel_error is None else error,
            f"{trial.build_seconds:.1f}",
            *speeds,
            style=style,
        )
    return table


def e2e_table(result) -> Table:
    """bench --e2e: milliseconds per image in each stage from file to features."""
    table = Table(
        title=f"end to end: {count(result.images, 'image')}, batch {result.batch_size}, "
        f"{count(result.workers, 'worker')}, {result.images_per_second:.1f} img/s"
    )
    table.add_column("stage")
    table.add_column("ms per image", justify="right")
    for stage, value in result.breakdown().items():
        table.add_row(stage, f"{value:.2f}")
    return table
