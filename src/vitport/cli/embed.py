"""`vitport embed` and `vitport dedup`: wiring of vitport.embed to the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitport.cli.app import (
    DeviceOpt,
    DtypeOpt,
    FixOpt,
    ImageSizeOpt,
    ModelOpt,
    OverwriteOpt,
    RemoteCodeOpt,
    RuntimeOpt,
    WeightsOpt,
    console,
    errors,
    esc,
)
from vitport.cli.display import progress, show
from vitport.format import count


def embed(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Image files, directories (recursive), @list.txt (one path per line) or "
            ".parquet files with a path or image-bytes column."
        ),
    ],
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Images per forward pass; default: the fastest that fits."),
    ] = None,
    workers: Annotated[
        int, typer.Option(min=0, help="DataLoader workers that decode and preprocess.")
    ] = 2,
    image_size: ImageSizeOpt = None,
    weights: WeightsOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    fix: FixOpt = None,
    runtime: RuntimeOpt = "torch",
    outputs: Annotated[
        str | None,
        typer.Option(
            help="cls, pooled, registers, patches (comma-separated); default cls,pooled "
            "(pooled where the model has no CLS)."
        ),
    ] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Rows per part file.")] = 10_000,
    column: Annotated[
        str | None,
        typer.Option(help="Parquet column with paths or image bytes; default: path, else bytes."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start over in an existing --out.")
    ] = False,
    engine: Annotated[
        str, typer.Option(help="local, or ray (Ray Data; pip install 'vitport[ray]').")
    ] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="Join this running Ray cluster; default: a local one.")
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(help="I/N: this process writes every N-th shard from I (SLURM arrays)."),
    ] = None,
    stall_timeout: Annotated[
        float | None,
        typer.Option(
            help="With --engine ray: end the run (exit 1, shards kept) after this many seconds "
            "without a finished batch, saying what the cluster waits for. Default: 300."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Embed whole image collections: one row per image, resumable, losing nothing.

    Writes DIR/part-NNNNN.parquet (id, path, width, height and one float32 vector column per output), DIR/patches-NNNNN.safetensors with --outputs patches, DIR/errors.parquet (id, path, reason, message: one row per input that could not be embedded) and DIR/manifest.json (model, weights hash, dtype, preprocessing, counts, complete).

    Shards are written atomically: a run killed at any moment resumes with the same command and recomputes nothing already written; Ctrl-C first keeps the batches done and says so (exit code 130). Another model, dtype, preprocessing or outputs in an existing DIR is refused (--overwrite starts over). Exit code 0 when every input is embedded or explained in errors.parquet.
    """
    from vitport.cli.inputs import port_options
    from vitport.embed import Interrupted
    from vitport.embed import embed as run_embed

    port, _ = port_options(model, dtype, fix, weights, show=True)

    try:
        with progress(
            "loading", bar=True, eta=True, stderr=True, speed_from_first_tick=True, quiet=quiet
        ) as activity:
            summary = run_embed(
                sources,
                model,
                out,
                device=device,
                dtype=port.dtype,
                batch_size=batch_size,
                workers=workers,
                image_size=image_size,
                weights=weights,
                trust_remote_code=trust_remote_code,
                fixes=list(port.fixes),
                runtime=runtime,
                outputs=outputs,
                shard_size=shard_size,
                column=column,
                overwrite=overwrite,
                engine=engine,
                ray_address=ray_address,
                shard=shard,
                stall_timeout=stall_timeout,
                progress=lambda m: activity.update(esc(m)),
                on_batch=lambda done, total: activity.tick(done, total, "embedding"),
            )
    except Interrupted as exc:  # what was done is kept: say so, and how to go on
        errors.print(f"[yellow]interrupted:[/yellow] {esc(exc)}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    dims = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in summary.outputs.items())
    reasons = ", ".join(f"{reason} {n}" for reason, n in summary.error_reasons.items())
    console.print()  # apart from the progress and the libraries' own output above
    console.print(
        f"{summary.embedded} embedded, {summary.errors} in errors.parquet"
        f"{f' ({reasons})' if reasons else ''}, of {count(summary.inputs, 'input')} "
        f"({dims}) in [bold]{esc(summary.out)}[/bold]"
        + ("" if summary.complete else " [yellow](incomplete: other shards pending)[/yellow]")
    )
    if summary.written_now:
        workers = count(summary.workers, "worker" if summary.engine == "local" else "actor")
        console.print(
            f"[dim]this run: {count(summary.written_now, 'input')} in {summary.seconds:.1f} s, "
            f"{summary.images_per_second:.1f} img/s at batch {summary.batch_size}, {workers}; "
            f"{summary.bottleneck()}[/dim]"
        )
        console.print(f"[dim]batch {summary.batch_size}: {esc(summary.batch_size_reason)}[/dim]")
    if summary.skipped_done:
        done = count(summary.skipped_done, "input was", "inputs were")
        console.print(f"[dim]resumed: {done} already written[/dim]")
    for note in summary.notes:
        console.print(f"[yellow]note:[/yellow] {esc(note)}")


def dedup(
    directory: Annotated[Path, typer.Argument(help="A directory written by vitport embed.")],
    threshold: Annotated[
        float,
        typer.Option(
            min=-1.0,
            max=1.0,
            help="Cosine similarity at or above which two images are near-duplicates.",
        ),
    ] = 0.95,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the pairs here (.parquet).")
    ] = None,
    column: Annotated[str, typer.Option(help="Which output to compare.")] = "pooled",
    top: Annotated[int, typer.Option("--show", min=0, help="Pairs to print.")] = 20,
    overwrite: OverwriteOpt = False,
) -> None:
    """Near-duplicate pairs by cosine similarity of the embeddings.

    FAISS when installed, else blocked matrix products: never the full N x N matrix in memory.
    """
    from vitport.cli.tables import pairs_table
    from vitport.embed.dedup import is_pairs_file, near_duplicates, write_pairs
    from vitport.outputs import check_file

    check_file(out, "out", overwrite, is_pairs_file)
    pairs = near_duplicates(directory, threshold, column)
    console.print(pairs.describe())
    if len(pairs) and top:
        show(pairs_table(pairs, top))
    if out is not None:
        write_pairs(pairs, out)
        everything = "all " + count(len(pairs), "pair") if len(pairs) != 1 else "the pair"
        console.print(f"{everything} written to [bold]{esc(out)}[/bold]")
