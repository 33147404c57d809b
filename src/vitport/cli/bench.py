"""`vitport bench`: latency and throughput on the device, end to end, or the --optimize search."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitport.cli.app import (
    BudgetOpt,
    CudaShimOpt,
    DeviceOpt,
    DtypeOpt,
    FixOpt,
    ImagesArg,
    ImageSizeOpt,
    MinSecondsOpt,
    ModelOpt,
    OverwriteOpt,
    RemoteCodeOpt,
    RuntimeOpt,
    RuntimesOpt,
    WeightsOpt,
    console,
    errors,
    esc,
)
from vitport.cli.display import progress, show, steps
from vitport.cli.inputs import find_inputs, load_model, port_options
from vitport.errors import VitportError

BENCH_DROP = (
    "samples",
    "MFU vendor",
    "p95 ms",
    "p90 ms",
    "mean ± std ms",
    "peak mem",
    "TFLOP/s",
    "ms/img",
)


def parse_batch_sizes(text: str) -> list[int] | None:
    if text == "auto":
        return None
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise VitportError(f"--batch-sizes takes a list like 1,2,4,8 or 'auto', not '{text}'")
    return sizes


def bench(
    model: ModelOpt,
    images: ImagesArg = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    batch_sizes: Annotated[
        str,
        typer.Option(
            help="Comma-separated batch sizes, or 'auto' (double until out of "
            "memory or no more gain)."
        ),
    ] = "1,2,4,8",
    attn: Annotated[
        str, typer.Option(help="Attention: default, eager, sdpa or flash.")
    ] = "default",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    e2e: Annotated[
        bool,
        typer.Option(
            "--e2e",
            help="Time the whole path from image files (decode, "
            "preprocess, copy, model) with DataLoader workers.",
        ),
    ] = False,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader workers for --e2e.")] = 2,
    optimize: Annotated[
        bool,
        typer.Option(
            "--optimize",
            help="Search runtime x dtype x attention x compile x batch for the "
            "fastest configuration that still passes compare.",
        ),
    ] = False,
    budget: BudgetOpt = None,
    runtime: RuntimeOpt = "torch",
    runtimes: RuntimesOpt = None,
    min_seconds: MinSecondsOpt = 2.0,
    warmup_seconds: Annotated[float, typer.Option(min=0.0, help="Warm-up per batch size.")] = 1.0,
    fix: FixOpt = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Every sample and statistic.")
    ] = None,
    csv_out: Annotated[
        Path | None, typer.Option("--csv", help="timm benchmark.py columns.")
    ] = None,
    markdown: Annotated[
        Path | None, typer.Option("--markdown", help="The table as Markdown.")
    ] = None,
    baseline: Annotated[
        Path | None, typer.Option(help="An earlier --json: flag regressions beyond the noise.")
    ] = None,
    overwrite: OverwriteOpt = False,
    image_size: ImageSizeOpt = None,
    weights: WeightsOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    cuda_shim: CudaShimOpt = False,
) -> None:
    """How fast is it? Latency and throughput on the device itself, against the roofline.

    Each call is timed with device events (or synchronisation at its edges), after a warm-up by
    count and by time, over a window that lasts until both a minimum number of calls and a
    minimum duration are reached. Percentiles use linear interpolation over the raw samples.
    FLOPs per image are counted from the config; MFU is against a peak measured here with a
    large matmul in the same dtype, and against the vendor's figure where one is known.
    """
    from vitport.bench.baseline import check_baseline, read_baseline
    from vitport.bench.configure import (
        check_attention,
        check_budget,
        check_e2e,
        check_optimize_alone,
    )
    from vitport.bench.run import CSV_COLUMNS, MARKDOWN_HEAD, Window, regressions
    from vitport.bench.run import bench as run_bench
    from vitport.cli.bench_tables import bench_table
    from vitport.fixes import parse_fixes
    from vitport.outputs import check_file, first_line_is, is_vitport_json
    from vitport.runtimes import Setup

    sizes = parse_batch_sizes(batch_sizes)
    fixes = parse_fixes(fix)
    check_file(json_out, "json", overwrite, is_vitport_json)
    check_file(csv_out, "csv", overwrite, first_line_is(",".join(CSV_COLUMNS)))
    check_file(markdown, "markdown", overwrite, first_line_is(MARKDOWN_HEAD))
    e2e_paths = None
    if e2e:
        check_e2e(images)
        e2e_paths, _ = find_inputs(images)  # missing and non-image files: said before the load
    check_attention(attn)
    old = read_baseline(baseline) if baseline else None
    port, _ = port_options(model, dtype, fix, weights)
    if old is not None:
        check_baseline(old, baseline, model, port.dtype, attn, compile)
    window = Window(warmup_seconds=warmup_seconds, min_seconds=min_seconds)
    seconds = check_budget(budget, optimize)
    if runtimes is not None and not optimize:
        raise VitportError("--runtimes lists what --optimize searches; use --runtime NAME alone")
    if optimize:
        check_optimize_alone(
            dtype=dtype or "fp32",
            attention=attn,
            compiled=compile,
            fixes=fixes,
            e2e=e2e,
            csv=csv_out is not None,
            markdown=markdown is not None,
            baseline=baseline is not None,
            runtime=runtime,
        )
        from vitport.cli.bench_optimize import bench_optimize

        return bench_optimize(
            model,
            images,
            device,
            sizes or [1, 8],
            window,
            image_size,
            weights,
            trust_remote_code,
            cuda_shim,
            json_out,
            seconds,
            runtimes,
        )
    if runtime not in ("torch", "compile") and (attn != "default" or compile):
        raise VitportError(
            f"--runtime {runtime} runs the exported graph; drop --attn and --compile"
        )
    setup = Setup(runtime, port.dtype, attn, compile, port.fixes)
    encoder = load_model(
        model, device, setup, image_size, weights, trust_remote_code, cuda_shim, sizes, port.note
    )
    with progress("benchmarking ...") as activity:
        result = run_bench(encoder, sizes, window, setup=setup, progress=steps(activity))
    show(bench_table(result), BENCH_DROP)
    best = result.best()
    peak = result.peak
    console.print(
        f"{result.flops.gflops:.2f} GFLOPs per image (counted from the config); "
        f"peak measured here: {peak.tflops:.2f} TFLOP/s ({peak.size}^3 {peak.dtype} matmul)"
        + (f"; vendor peak {result.vendor_tflops:g} TFLOP/s" if result.vendor_tflops else "")
        + f". Load {result.load_seconds:.1f} s; first call "
        f"{1000 * result.runs[0].measurement.first_call:.0f} ms."
    )
    if best is not None:
        console.print(
            f"[bold]best throughput:[/bold] {best.measurement.images_per_second:.1f} img/s at "
            f"batch {best.batch_size}"
        )
    for note in result.notes + encoder.notes:
        console.print(f"[yellow]note:[/yellow] {esc(note)}", soft_wrap=True)
    if e2e:
        bench_e2e(encoder, e2e_paths, workers, sizes[0] if sizes else 8)
    data = result.to_dict()
    if old is not None:
        found = regressions(old, result)
        for reg in found:
            console.print(
                f"[red]regression[/red] at batch {reg.batch_size}: "
                f"{reg.old_images_per_second:.1f} -> {reg.new_images_per_second:.1f} img/s "
                f"({100 * reg.change:+.1f}%, noise {100 * reg.noise:.1f}%)"
            )
        if not found:
            console.print("no regression beyond the run-to-run noise against the baseline")
        data["regressions"] = [vars(r) | {"change": r.change} for r in found]
    write_outputs(data, json_out, result.to_csv(), csv_out, result.to_markdown(), markdown)
    if old is not None and data["regressions"]:
        raise typer.Exit(1)


def write_outputs(data, json_out, csv_text, csv_out, md_text, md_out) -> None:
    import json

    from vitport.outputs import write_text

    for path, text in ((json_out, None), (csv_out, csv_text), (md_out, md_text)):
        if path is None:
            continue
        write_text(path, json.dumps(data, indent=2) if text is None else text)
        console.print(f"written: [bold]{esc(path)}[/bold]")


def bench_e2e(encoder, paths, workers, batch_size) -> None:
    from vitport.bench.e2e import run_e2e
    from vitport.cli.bench_tables import e2e_table

    with progress("end to end from files ..."):
        result = run_e2e(encoder, paths, batch_size=batch_size, workers=workers)
    console.print(e2e_table(result))
    console.print(result.bottleneck())
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {esc(note)}", soft_wrap=True)
    for name, reason in result.skipped:
        errors.print(f"[yellow]skipped[/yellow] {esc(name)}: {esc(reason)}", soft_wrap=True)
