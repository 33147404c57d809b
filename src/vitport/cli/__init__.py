"""The `vitport` command: thin wiring of the library to typer and rich."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from vitport.errors import VitportError


def esc(text: object) -> str:
    """User text (paths, specs, image names, messages) printed as written, never as markup."""
    from rich.markup import escape

    return escape(str(text))


app = typer.Typer(
    name="vitport",
    help=(
        "Bring vision-transformer encoders (DINOv2, DINOv3, ViT, AIMv2, timm ViTs) to new "
        "hardware (Ascend NPU, CUDA, CPU, ...): load, run, and prove the port faithful and fast.\n\n"
        "Model specs: demo:dinov2-small (a real trained model, no model hub needed), hf:ORG/NAME or ORG/NAME "
        "(Hugging Face), ms:ORG/NAME (ModelScope), timm:NAME [--weights FILE], or a local "
        "directory."
    ),
    epilog=(
        "A port, step by step: [bold]vitport infer[/bold] (does it run?), [bold]vitport compare "
        "--localize --try-fixes[/bold] (is it faithful, and if not, where and what cures it?), "
        "[bold]vitport bench --optimize[/bold] (how fast, and the fastest faithful setting), "
        "[bold]vitport report[/bold] (all of it, written up). [bold]vitport convert[/bold] moves "
        "checkpoints between layouts and to ONNX, proven unchanged; [bold]vitport embed[/bold] "
        "turns image collections into features. Errors are one line and exit 2; "
        "put --debug before the command for a traceback."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)
STATE = {"debug": False, "quiet": False, "wide": False}

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m",
        help="Model spec: demo:NAME, hf:ORG/NAME, ms:ORG/NAME, timm:NAME, or a local directory.",
    ),
]  # fmt: skip
DeviceOpt = Annotated[
    str, typer.Option("--device", "-d", help="auto, cpu, cuda[:N], npu[:N], xpu or mps.")
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="fp32, fp16 or bf16.")]
ImageSizeOpt = Annotated[
    int | None,
    typer.Option(
        min=1, help="Input side in pixels (a multiple of the patch size); default: the model's."
    ),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(help="Local weights (.safetensors, or weights-only .pth) for timm:NAME."),
]
RemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow a checkpoint's own Python code to run.")
]
CudaShimOpt = Annotated[
    bool,
    typer.Option(
        "--cuda-shim", help="Forward torch.cuda calls to the NPU, for code written for CUDA."
    ),
]
BudgetOpt = Annotated[
    float | None,
    typer.Option(
        min=1.0,
        help="--optimize: stop after about this many seconds; the likeliest winners run "
        "first and what was skipped is listed.",
    ),
]
MinSecondsOpt = Annotated[float, typer.Option(min=0.0, help="Measured window per batch size.")]
OverwriteOpt = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace output files that vitport did not write."),
]
FixOpt = Annotated[
    str | None,
    typer.Option("--fix", help="Precision fixes to apply, comma-separated (see vitport fixes)."),
]


ImagesArg = Annotated[
    list[Path] | None, typer.Argument(help="Image files or directories (searched recursively).")
]


def show_version(value: bool) -> None:
    if value:
        from vitport import __version__

        console.print(f"vitport {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[
        bool,
        typer.Option("--debug", help="Show full tracebacks on errors (also after the command)."),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars or spinners; results only.")
    ] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="Every table column, whatever the terminal's width.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=show_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    STATE["debug"] = debug or STATE["debug"]
    STATE["quiet"] = quiet
    STATE["wide"] = wide


BENCH_DROP = ("samples", "MFU vendor", "p95 ms", "p90 ms", "mean ± std ms", "peak mem",
              "TFLOP/s", "ms/img")  # fmt: skip
ACCURACY_DROP = ("mse", "vec rel", "cos mean", "floor rel err", "max abs", "rel err mean")


def show(table, drop_order: tuple[str, ...] = ()) -> None:
    """Print a table whole: columns fold rather than cut, and at a narrow terminal the least
    needed ones (drop_order) go first; --wide keeps them all."""
    from vitport.cli_tables import fit, natural_width

    if STATE["wide"]:  # the whole table, as wide as it needs, past the terminal's edge
        table = fit(table, None)
        Console(width=max(console.width, natural_width(table))).print(table)
    else:
        console.print(fit(table, console.width, drop_order))


def load_model(spec: str, device: str, dtype: str, image_size: int | None, weights: Path | None,
               trust_remote_code: bool, cuda_shim: bool, fixes: list[str] = ()):  # fmt: skip
    """Shared by every command: the shim first, then the one door, then the fixes."""
    import vitport
    from vitport.devices import enable_cuda_shim
    from vitport.fixes import apply_fixes

    if cuda_shim:
        errors.print(f"[dim]{enable_cuda_shim()}[/dim]")
    with spinner(f"loading {esc(spec)} ..."):
        encoder = vitport.load(
            spec, device, dtype, image_size=image_size, weights=weights,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
    for report in apply_fixes(encoder, fixes):
        errors.print(f"[dim]fix {report.name}: {esc(report.detail)}[/dim]", soft_wrap=True)
    return encoder


def report_problems(problems) -> None:
    for problem in problems:
        errors.print(
            f"[yellow]skipped[/yellow] {esc(problem.name)}: {esc(problem.reason)}", soft_wrap=True
        )


def fmt_values(values, count: int = 4) -> str:
    return " ".join(f"{v:+.3f}" for v in values[:count].tolist())


@app.command()
def infer(
    model: ModelOpt,
    images: ImagesArg = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    out: Annotated[
        Path | None, typer.Option(help="Save the Features (safetensors + metadata) to this file.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 1,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader workers that decode images.")] = 2,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 when any given image could not be read.")
    ] = False,
    with_blocks: Annotated[
        bool,
        typer.Option(
            "--with-blocks",
            help="--out also stores every block's hidden states, so that compare --localize "
            "can find the block where another machine departs from this one.",
        ),
    ] = False,
    block_images: Annotated[
        int | None, typer.Option(min=1, help="With --with-blocks: images that carry block states.")
    ] = None,
    blocks_fp32: Annotated[
        bool, typer.Option("--blocks-fp32", help="Store block states in fp32, not the run's dtype.")
    ] = False,
    max_bytes: Annotated[
        float, typer.Option(min=1, help="Refuse a --with-blocks file larger than this.")
    ] = 2e9,
    fix: FixOpt = None,
    image_size: ImageSizeOpt = None,
    weights: WeightsOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    cuda_shim: CudaShimOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run a model on images: output shapes, first pooled values, per-image latency.

    With no images, 8 real photos shipped with scikit-image and 2 seeded random images are
    used, the same set `vitport compare` uses. --out writes the
    features as a golden file that `vitport compare --reference FILE` accepts on another machine.
    """
    from vitport.fixes import parse_fixes
    from vitport.images import default_inputs, read_images
    from vitport.infer import infer as run_infer
    from vitport.infer import infer_inputs
    from vitport.outputs import check_file, is_features_file
    from vitport.stream import file_inputs

    fixes = parse_fixes(fix)
    check_file(out, "--out", overwrite, is_features_file)
    if with_blocks and out is None:
        raise VitportError("--with-blocks stores block states in the --out file; add --out FILE")
    paths = find_inputs(images)
    encoder = load_model(
        model, device, dtype, image_size, weights, trust_remote_code, cuda_shim, fixes
    )
    if paths is None:
        loaded = default_inputs(encoder.image_size[0])
        result = run_infer(encoder, loaded, batch_size)
    else:
        with progress_bar("encoding") as tick:
            result = infer_inputs(encoder, file_inputs(paths), batch_size, workers, tick)
        report_problems(result.problems)
    problems = result.problems
    feats = result.features
    h, w = encoder.image_size

    summary = Table(
        title=f"{esc(model)} on {encoder.device} ({feats.meta['dtype']}), {h}x{w} input"
    )
    summary.add_column("output")
    summary.add_column("shape")
    for name, shape in feats.shapes().items():
        summary.add_row(name, " x ".join(map(str, shape)))
    show(summary)
    console.print(
        f"[dim]{encoder.family}, {encoder.num_params / 1e6:.1f}M parameters, tokens: "
        f"{encoder.layout.describe(h, w)}; source: {encoder.source}[/dim]"
    )
    for note in encoder.notes:
        console.print(f"[yellow]note:[/yellow] {esc(note)}")

    per_image = Table(title="per image")
    for column in ("image", "size", "latency ms", "pooled[:4]"):
        per_image.add_column(column, justify="right" if column == "latency ms" else "left")
    pooled = feats.pooled if feats.pooled is not None else feats.patches.mean(1)
    for i, name in enumerate(feats.names):
        ow, oh = result.original_sizes[i]
        per_image.add_row(
            esc(name), f"{ow}x{oh}", f"{result.per_image_ms[i]:.1f}", fmt_values(pooled[i])
        )
    show(per_image, ("pooled[:4]", "size"))
    console.print(
        f"[dim]latency is device time (synchronised); the first call ({result.first_call_ms:.1f} ms) "
        "includes warm-up and kernel selection. Load took "
        f"{encoder.load_seconds:.1f} s.[/dim]"
    )
    if out is not None:
        from vitport.compare.localize import golden_file_parts

        feats.meta["skipped"] = [[p.name, p.reason] for p in problems]
        feats.meta["image_sha256"] = result.content_sha256
        feats.meta["device_description"] = encoder.device.describe()
        extra, header = {}, {}
        if with_blocks:
            with spinner("recording block states ..."):
                count = block_images or len(feats.names)
                chosen = loaded[:count] if paths is None else read_images(feats.names[:count])[0]
                extra, header = golden_file_parts(encoder, chosen, batch_size, blocks_fp32,
                                                  int(max_bytes))  # fmt: skip
        path = feats.save(out, extra, header)
        size = path.stat().st_size
        blocks = f", with block states at {len(extra)} points" if extra else ""
        console.print(f"features saved to [bold]{esc(path)}[/bold] ({size / 1e6:.1f} MB{blocks})")
    import torch

    broken = [name for name, t in feats.groups().items() if not torch.isfinite(t).all()]
    if broken:
        console.print(
            f"[yellow]warning:[/yellow] the {', '.join(broken)} output holds NaN or inf; "
            "check the dtype (fp16 overflows above 65504) or compare it: vitport compare"
        )
    if problems:
        console.print(
            f"{len(feats.names)} images encoded, [yellow]{len(problems)} could not be read[/yellow] "
            "(listed above)"
        )
        if strict:
            raise typer.Exit(1)


class _Silent:
    def update(self, *_args, **_kwargs) -> None:
        pass


@contextlib.contextmanager
def spinner(text: str):
    """A status spinner on the console, or nothing with --quiet; yields an object with update()."""
    if STATE["quiet"]:
        yield _Silent()
        return
    with console.status(text) as status:
        yield status


def find_inputs(images: list[Path] | None) -> list[Path] | None:
    """The image files given (directories expanded), None for the default inputs."""
    from vitport.images import find_images

    if not images:
        return None
    paths = find_images(images)
    if not paths:
        raise VitportError(f"no images found in {', '.join(map(str, images))}")
    return paths


@contextlib.contextmanager
def progress_bar(what: str):
    """A transient bar with images/s on stderr (none with --quiet); yields on_batch(done, total)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[speed]}"),
    )
    with Progress(*columns, console=errors, transient=True, disable=STATE["quiet"]) as bar:
        task = bar.add_task(what, total=None, speed="")
        start = time.perf_counter()

        def tick(done: int, total: int) -> None:
            spent = time.perf_counter() - start
            speed = f"{done / spent:.1f} img/s" if spent > 0 else ""
            bar.update(task, completed=done, total=total, speed=speed)

        yield tick


def read_inputs(images: list[Path] | None, size: int):
    """The user's images, or the default set: real photos plus seeded random inputs."""
    from vitport.images import default_inputs, read_images

    if not images:
        return default_inputs(size), []
    loaded, problems = read_images(images)
    report_problems(problems)
    if not loaded:
        raise VitportError("none of the given images could be read; see the reasons above")
    return loaded, problems


@app.command()
def compare(
    model: ModelOpt,
    images: ImagesArg = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    reference: Annotated[
        str,
        typer.Option(
            "--reference",
            "-r",
            help="A device to run the reference on in this process (cpu, cuda, ...), or a golden "
            "features file written by `vitport infer --out` on another machine.",
        ),
    ] = "cpu",
    reference_dtype: Annotated[
        str, typer.Option(help="dtype of an in-process reference.")
    ] = "fp32",
    part_reference: Annotated[
        str,
        typer.Option(
            help="With a golden file's block states: the device (fp32) in this process that the "
            "parts of the culprit block are compared with."
        ),
    ] = "cpu",
    fix: FixOpt = None,
    localize: Annotated[
        bool, typer.Option("--localize", help="Find the first block whose own error stands out.")
    ] = False,
    try_fixes: Annotated[
        bool, typer.Option("--try-fixes", help="Compare again with each fix and with all together.")
    ] = False,
    threshold: Annotated[
        list[str] | None,
        typer.Option(
            "--threshold",
            "-t",
            help="Override a limit: METRIC=VALUE or GROUP.METRIC=VALUE (repeatable).",
        ),
    ] = None,
    inject_fault: Annotated[
        str | None,
        typer.Option(
            help="Plant a known fault KIND@BLOCK in the candidate (gelu-tanh@7, "
            "layernorm-bf16@3) to check that localisation and fixes find it."
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write every number here.")
    ] = None,
    per_input: Annotated[
        bool, typer.Option("--per-input", help="Also show the error of each input.")
    ] = False,
    overwrite: OverwriteOpt = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 4,
    image_size: ImageSizeOpt = None,
    weights: WeightsOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    cuda_shim: CudaShimOpt = False,
) -> None:
    """Is the port faithful? The device's output against a reference, with the noise floor.

    Metrics per output group (CLS, registers, patches, pooled, logits): relative error
    mean|d|/mean|ref| (seed 000), vector relative error, max/mean abs, MSE, cosine per token,
    top-1/top-5 of logits, nearest-neighbour agreement of pooled features; beside each, the
    same metric between fp32 and fp64 on the CPU (the arithmetic noise floor). Exit code 0 when
    every threshold passes, 1 when one fails: it can gate CI.
    """
    import json

    from vitport import Features
    from vitport.compare.run import candidate_factory
    from vitport.compare.run import compare as run_compare
    from vitport.compare.verdict import parse_threshold_overrides, thresholds_for
    from vitport.devices import parse_dtype, resolve_device
    from vitport.faults import parse_fault
    from vitport.fixes import fix_names, parse_fixes
    from vitport.images import images_by_name
    from vitport.outputs import check_file, is_vitport_json, write_text

    try:
        overrides = parse_threshold_overrides(threshold or [])
    except ValueError as exc:
        raise VitportError(str(exc)) from exc
    check_file(json_out, "--json", overwrite, is_vitport_json)
    fixes = parse_fixes(fix)
    if inject_fault:
        parse_fault(inject_fault)
    golden = None
    if Path(reference).is_file():
        from vitport.compare.localize import GoldenBlocks

        golden = Features.load(reference)
        golden.meta["path"] = reference
        if localize and GoldenBlocks.open(reference) is None:
            raise VitportError(
                f"{reference} holds final outputs only; to localise against it, write it with "
                "vitport infer --out FILE --with-blocks (or localise with --reference cpu)"
            )
    elif "/" in reference or reference.endswith(".safetensors"):
        raise VitportError(f"golden file {reference} not found; write one with vitport infer --out")
    else:
        ref_device = resolve_device(reference)
    target = resolve_device(device)
    cand_dtype = parse_dtype(dtype)
    ref_dtype = parse_dtype(reference_dtype)

    if golden is not None and not images:
        loaded, problems = images_by_name(golden.names)
        report_problems(problems)
    else:
        loaded, problems = read_inputs(images, image_size or 224)
    base = load_model(model, "cpu", "fp32", image_size, weights, trust_remote_code, cuda_shim)

    make_candidate = candidate_factory(base, target, cand_dtype, inject_fault)
    candidate, detail = make_candidate(fixes)
    notes = [f"candidate: {detail}"] if detail else []
    if golden is None:
        same = ref_device == resolve_device("cpu") and ref_dtype == base.dtype
        ref = base if same else base.to(ref_device, ref_dtype)
    else:
        ref = golden
    trials = [(name,) for name in fix_names()] if try_fixes else []
    parts = None
    if golden is not None and localize:
        part_device = resolve_device(part_reference)
        parts = base if part_device == resolve_device("cpu") else base.to(part_device)
    with spinner("comparing ...") as status:
        result = run_compare(
            base, candidate, ref, loaded, thresholds_for(cand_dtype, overrides),
            localize_points=localize, trial_fixes=trials, make_candidate=make_candidate,
            batch_size=batch_size, fixes=fixes, progress=lambda m: status.update(esc(m) + " ..."),
            notes=notes, part_reference=parts,
        )  # fmt: skip
    for t in overrides:
        if t.group and t.group not in result.groups:
            errors.print(
                f"[yellow]warning:[/yellow] -t {esc(t.spec())}: {esc(model)} has no {t.group} "
                f"output, so this limit judges nothing (outputs: {', '.join(result.groups)})",
                soft_wrap=True,
            )
    render_compare(result, per_input)
    if json_out is not None:
        write_text(json_out, json.dumps(result.to_dict(), indent=2))
        console.print(f"every number written to [bold]{esc(json_out)}[/bold]")
    if not result.passed:
        raise typer.Exit(1)


def render_compare(result, per_input: bool = False) -> None:
    from vitport import cli_tables

    show(cli_tables.accuracy_table(result), ACCURACY_DROP)
    if per_input:
        show(cli_tables.per_input_table(result))
    for line in cli_tables.task_lines(result):
        console.print(line)
    console.print(
        "[dim]floor = the same metric between fp32 and fp64 on the CPU; x floor = how many times "
        "the arithmetic noise of fp32 this error is.[/dim]"
    )
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {esc(note)}")
    if result.localization is not None:
        show(cli_tables.localization_table(result), ("accumulated",))
        loc = result.localization
        if loc.culprit:
            console.print(
                f"[bold]first diverging point:[/bold] {esc(loc.culprit)}: {esc(loc.reason)}"
            )
        else:
            console.print(f"[bold]no single culprit:[/bold] {esc(loc.reason)}")
    if result.trials:
        show(cli_tables.trials_table(result))
        best = result.best_trial()
        if best is not None:
            from vitport.format import pct

            console.print(
                f"[bold]best fix:[/bold] --fix {best.fixes[0]} (worst relative error "
                f"{pct(result.worst_rel_error)} -> {pct(best.worst_rel_error)})"
            )
        elif result.passed:
            console.print("no fix needed: the port passes, and no fix halves its error")
        else:
            console.print("[bold]no single fix passes and halves the error[/bold]")
    console.print(cli_tables.verdict_text(result))


@app.command()
def fixes() -> None:
    """List the precision fixes any command can apply with --fix."""
    from vitport.fixes import FIXES

    table = Table(title="precision fixes")
    table.add_column("name")
    table.add_column("what it does")
    for fix in FIXES.values():
        table.add_row(fix.name, esc(fix.help))
    show(table)


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


@app.command()
def bench(
    model: ModelOpt,
    images: ImagesArg = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
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
            help="Search dtype x attention x compile x batch for the "
            "fastest configuration that still passes compare.",
        ),
    ] = False,
    budget: BudgetOpt = None,
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

    from vitport.bench.configure import ATTENTION, configure
    from vitport.bench.run import CSV_COLUMNS, MARKDOWN_HEAD, Window, regressions
    from vitport.bench.run import bench as run_bench
    from vitport.fixes import parse_fixes
    from vitport.outputs import check_file, first_line_is, is_vitport_json

    sizes = parse_batch_sizes(batch_sizes)
    fixes = parse_fixes(fix)
    check_file(json_out, "--json", overwrite, is_vitport_json)
    check_file(csv_out, "--csv", overwrite, first_line_is(",".join(CSV_COLUMNS)))
    check_file(markdown, "--markdown", overwrite, first_line_is(MARKDOWN_HEAD))
    if e2e and not images:
        raise VitportError("--e2e needs image files or a directory to read")
    if attn not in ATTENTION:
        raise VitportError(f"--attn {attn} is unknown; choose one of {', '.join(ATTENTION)}")
    old = read_baseline(baseline) if baseline else None
    if old is not None:
        from vitport.devices import dtype_name, parse_dtype

        theirs = (old.spec, old.dtype, old.attention, old.compiled)
        ours = (model, dtype_name(parse_dtype(dtype)), attn, compile)
        if theirs != ours:
            raise VitportError(
                f"baseline {baseline} measured {theirs}, this run is {ours} "
                "(model, dtype, attention, compiled); compare like with like"
            )
    window = Window(warmup_seconds=warmup_seconds, min_seconds=min_seconds)
    if budget is not None and not optimize:
        raise VitportError("--budget applies to --optimize; add --optimize or drop --budget")
    if optimize:
        clashing = [flag for flag, given in (
            ("--dtype", dtype != "fp32"), ("--attn", attn != "default"), ("--compile", compile),
            ("--fix", bool(fixes)), ("--e2e", e2e), ("--csv", csv_out is not None),
            ("--markdown", markdown is not None), ("--baseline", baseline is not None),
        ) if given]  # fmt: skip
        if clashing:
            raise VitportError(
                f"--optimize chooses dtype, attention and compile itself and writes --json only; "
                f"drop {', '.join(clashing)}"
            )
        return bench_optimize(model, images, device, sizes or [1, 8], window, image_size,
                              weights, trust_remote_code, cuda_shim, json_out, budget)  # fmt: skip
    encoder = load_model(model, device, dtype, image_size, weights, trust_remote_code, cuda_shim,
                         fixes)  # fmt: skip
    configure(encoder, attn, compile)
    with spinner("benchmarking ...") as status:
        result = run_bench(encoder, sizes, window, attention=attn, compiled=compile,
                           progress=lambda m: status.update(esc(m) + " ..."))  # fmt: skip
    from vitport import cli_tables

    show(cli_tables.bench_table(result), BENCH_DROP)
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
        bench_e2e(encoder, images, workers, sizes[0] if sizes else 8, console)
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


def read_baseline(path: Path):
    import json

    from vitport.bench.run import BenchResult

    try:
        return BenchResult.from_dict(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise VitportError(
            f"baseline {path} not found; write one with vitport bench --json"
        ) from exc
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise VitportError(
            f"{path} is not a vitport bench --json file ({type(exc).__name__}: {exc})"
        ) from exc


def write_outputs(data, json_out, csv_text, csv_out, md_text, md_out) -> None:
    import json

    from vitport.outputs import write_text

    for path, text in ((json_out, None), (csv_out, csv_text), (md_out, md_text)):
        if path is None:
            continue
        write_text(path, json.dumps(data, indent=2) if text is None else text)
        console.print(f"written: [bold]{esc(path)}[/bold]")


def bench_e2e(encoder, images, workers, batch_size, out) -> None:
    from vitport.bench.e2e import run_e2e
    from vitport.images import find_images

    if not images:
        raise VitportError("--e2e needs image files or a directory to read")
    paths = find_images(images)
    with out.status("end to end from files ..."):
        result = run_e2e(encoder, paths, batch_size=batch_size, workers=workers)
    table = Table(title=f"end to end: {result.images} images, batch {result.batch_size}, "
                  f"{result.workers} workers, {result.images_per_second:.1f} img/s")  # fmt: skip
    table.add_column("stage")
    table.add_column("ms per image", justify="right")
    for stage, value in result.breakdown().items():
        table.add_row(stage, f"{value:.2f}")
    out.print(table)
    out.print(result.bottleneck())
    for note in result.notes:
        out.print(f"[yellow]note:[/yellow] {esc(note)}", soft_wrap=True)
    for name, reason in result.skipped:
        errors.print(f"[yellow]skipped[/yellow] {esc(name)}: {esc(reason)}", soft_wrap=True)


def bench_optimize(model, images, device, sizes, window, image_size, weights, trust_remote_code,
                   cuda_shim, json_out, budget=None) -> None:  # fmt: skip
    import json

    from vitport import cli_tables
    from vitport.bench.optimize import optimize as run_optimize
    from vitport.devices import resolve_device

    target = resolve_device(device)
    loaded, _ = read_inputs(images, image_size or 224)
    base = load_model(model, "cpu", "fp32", image_size, weights, trust_remote_code, cuda_shim)
    with spinner("optimising ...") as status:
        result = run_optimize(base, target, loaded, sizes, window, budget=budget,
                              progress=lambda m: status.update(esc(m) + " ..."))  # fmt: skip
    show(cli_tables.optimize_table(result))
    if result.skipped:
        console.print(
            f"[yellow]budget reached:[/yellow] {len(result.skipped)} configurations not tried "
            f"({', '.join(result.skipped)})",
            highlight=False,
        )
    best = result.best()
    if best is None:
        console.print("[red]no configuration was faithful[/red]")
    else:
        trial, batch = best
        speedup = result.speedup()
        console.print(
            f"[bold]fastest faithful:[/bold] {trial.config.label()} at batch {batch}: "
            f"{trial.speed(batch):.1f} img/s"
            + (
                f", {speedup:.2f}x the baseline (fp32, attention as loaded, no compile) at the "
                f"same batch"
                if speedup
                else ""
            )  # fmt: skip
        )
    if json_out is not None:
        from vitport.outputs import write_text

        write_text(json_out, json.dumps(result.to_dict(), indent=2))
        console.print(f"written: [bold]{esc(json_out)}[/bold]")


@app.command()
def report(
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model spec (see vitport models); not with --from."),
    ] = None,
    images: ImagesArg = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    reference: Annotated[
        str, typer.Option("--reference", "-r", help="Device of the in-process reference.")
    ] = "cpu",
    reference_dtype: Annotated[str, typer.Option(help="dtype of the reference.")] = "fp32",
    golden: Annotated[
        Path | None, typer.Option(help="A golden features file from another machine.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory to write the report into.")] = Path("report"),
    lang: Annotated[str, typer.Option(help="Language of README.md: en or zh.")] = "en",
    batch_sizes: Annotated[
        str, typer.Option(help="Batch sizes to benchmark, or auto.")
    ] = "1,2,4,8",
    budget: BudgetOpt = None,
    min_seconds: MinSecondsOpt = 2.0,
    optimize: Annotated[
        bool,
        typer.Option(
            "--optimize",
            help="Also search dtype x attention x batch for the "
            "fastest configuration that stays faithful.",
        ),
    ] = False,
    fix: FixOpt = None,
    from_json: Annotated[
        Path | None,
        typer.Option("--from", help="Re-render an earlier report.json without recomputing."),
    ] = None,
    image_size: ImageSizeOpt = None,
    weights: WeightsOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    cuda_shim: CudaShimOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """The whole proof of a port in one command, in the form of the hand-written reports.

    Runs infer, bench and compare (with --localize and --try-fixes) and writes into --out:
    README.md (verdict first, then environment, weights, dependencies, inference sample,
    performance by batch size with MFU, accuracy with noise floor, fixes before/after, error by
    block, notes), report.json (every number), PNG plots, the raw JSON of each step and a log.
    """
    from vitport import Features
    from vitport.devices import enable_cuda_shim
    from vitport.fixes import parse_fixes
    from vitport.images import images_by_name
    from vitport.outputs import check_dir, is_report_dir
    from vitport.report import (
        LANGS,
        ReportOptions,
        RunLog,
        build_report,
        read_report,
        write_report,
    )

    if lang not in LANGS:
        raise VitportError(f"--lang {lang} is not available; choose one of {', '.join(LANGS)}")
    check_dir(out, "--out", overwrite, is_report_dir)
    if from_json is not None:
        path = write_report(read_report(from_json), out, lang)
        console.print(f"report re-rendered: [bold]{esc(path)}[/bold]")
        return
    if model is None:
        raise VitportError("vitport report needs --model SPEC (or --from DIR/report.json)")
    if budget is not None and not optimize:
        raise VitportError("--budget applies to --optimize; add --optimize or drop --budget")
    sizes = parse_batch_sizes(batch_sizes)
    fixes = parse_fixes(fix)
    gold = Features.load(golden) if golden is not None else None
    if gold is not None:
        gold.meta["path"] = str(golden)
    if gold is not None and not images:
        loaded, problems = images_by_name(gold.names)
        report_problems(problems)
    else:
        loaded, _ = read_inputs(images, image_size or 224)
    if cuda_shim:
        errors.print(f"[dim]{enable_cuda_shim()}[/dim]")
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True, disable=STATE["quiet"]) as progress:  # fmt: skip
        task = progress.add_task(f"report on {esc(model)}")
        log = RunLog(echo=lambda m: progress.update(task, description=esc(m)))
        from vitport.bench.run import Window

        options = ReportOptions(
            spec=model, device=device, dtype=dtype, reference=reference,
            reference_dtype=reference_dtype, batch_sizes=tuple(sizes) if sizes else None,
            window=Window(min_seconds=min_seconds), fixes=tuple(fixes), image_size=image_size,
            weights=str(weights) if weights else None, trust_remote_code=trust_remote_code,
            optimize=optimize, budget=budget,
        )  # fmt: skip
        data = build_report(options, loaded, gold, log)
    path = write_report(data, out, lang)
    from vitport.report.render import STRINGS, headline

    for line in headline(data, STRINGS[lang]):
        console.print(line.replace("**", ""))
    console.print(f"report written: [bold]{esc(path)}[/bold]")


@app.command()
def thresholds() -> None:
    """Show the default pass/fail limits of `vitport compare` per dtype, and why."""
    from vitport.compare.verdict import DEFAULT_THRESHOLDS, THRESHOLD_REASONS

    for dtype, limits in DEFAULT_THRESHOLDS.items():
        table = Table(title=f"{dtype} defaults")
        table.add_column("group")
        table.add_column("metric")
        table.add_column("limit", justify="right")
        for t in limits:
            sign = ">" if t.higher_is_better else "<"
            table.add_row(t.group or "every group", t.metric, f"{sign} {t.limit:g}")
        show(table)
        console.print(THRESHOLD_REASONS[dtype], soft_wrap=False)
    console.print("override any of them with --threshold METRIC=VALUE or GROUP.METRIC=VALUE")


@app.command()
def models() -> None:
    """List the model specs and families vitport understands."""
    from vitport.families import SOURCES, demo_names
    from vitport.families.hf import supported_types

    table = Table(title="model specs")
    table.add_column("spec")
    table.add_column("meaning")
    for source in SOURCES:
        table.add_row(esc(source.example), esc(source.help))
    show(table)
    console.print(f"transformers model types: {supported_types()}")
    console.print("timm: Vision Transformers (timm.models.vision_transformer and kin)")
    console.print(f"demo models: {', '.join('demo:' + n for n in demo_names())}")


@app.command()
def devices() -> None:
    """Show the devices this machine offers and describe the default one."""
    from vitport.devices import available_devices, npu_problem, resolve_device

    console.print(f"available: {', '.join(available_devices())}")
    problem = npu_problem()
    if problem:
        from rich.markup import escape

        console.print(f"[yellow]npu:[/yellow] {escape(problem)}", soft_wrap=True)
    table = Table(title="auto device")
    table.add_column("field")
    table.add_column("value")
    for key, value in resolve_device("auto").describe().items():
        table.add_row(key, esc(value))
    show(table)


def main() -> None:
    """Entry point: run the app, turning known errors into one line and an exit code."""
    debug = "--debug" in sys.argv
    if debug:  # accepted before or after the command
        sys.argv = [sys.argv[0], "--debug", *(a for a in sys.argv[1:] if a != "--debug")]
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except VitportError as exc:
        if debug:
            raise
        errors.print(f"[red]error:[/red] {esc(exc)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        errors.print("[red]interrupted[/red]")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - anything else: one line, with the way to see more
        if hasattr(exc, "show") and hasattr(
            exc, "exit_code"
        ):  # click's (or typer's copy's) usage errors
            exc.show()
            sys.exit(exc.exit_code or 2)
        if type(exc).__name__ == "Abort":
            sys.exit(1)
        if debug:
            raise
        errors.print(
            f"[red]error:[/red] {type(exc).__name__}: {exc} (run with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


from vitport.cli import convert as _convert  # noqa: E402,F401  (registers the command)
from vitport.cli import embed as _embed  # noqa: E402,F401  (registers embed and dedup)


def _reflow_help() -> None:
    """Command help reflows to the terminal: a docstring's hard line breaks join within each
    paragraph (paragraphs stay apart)."""
    import inspect

    for info in app.registered_commands:
        doc = inspect.getdoc(info.callback) or ""
        info.help = "\n\n".join(" ".join(part.split()) for part in doc.split("\n\n")) or None


_reflow_help()
