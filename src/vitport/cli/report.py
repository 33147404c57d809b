"""`vitport report`: the whole proof of a port, written up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitport.cli.app import (
    MODEL_SPECS,
    BudgetOpt,
    CudaShimOpt,
    DeviceOpt,
    DtypeOpt,
    FixOpt,
    ImagesArg,
    ImageSizeOpt,
    MinSecondsOpt,
    OverwriteOpt,
    RemoteCodeOpt,
    WeightsOpt,
    console,
    esc,
)
from vitport.cli.bench import parse_batch_sizes
from vitport.cli.display import progress
from vitport.cli.inputs import enable_cuda_shim, port_options, read_inputs
from vitport.errors import VitportError


def report(
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help=f"Model spec: {MODEL_SPECS}; not with --from."),
    ] = None,
    images: ImagesArg = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    reference: Annotated[
        str,
        typer.Option(
            "--reference",
            "-r",
            help="Device of the in-process reference (a golden file or an msprobe dump is "
            "taken as --golden).",
        ),
    ] = "cpu",
    reference_dtype: Annotated[
        str, typer.Option(help="dtype of the reference: fp32, fp64, fp16 or bf16.")
    ] = "fp32",
    golden: Annotated[
        Path | None,
        typer.Option(
            help="A golden features file from another machine, or an msprobe tensor dump "
            "folder (L0 or mix), whose own inputs are then used."
        ),
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
    package: Annotated[
        bool,
        typer.Option(
            "--package",
            help="Make --out a model repository that can be published as it is: the report "
            "headed by model-card metadata, the weights as loaded, vitport.json, the "
            "reference's golden file and requirements.txt.",
        ),
    ] = False,
    no_weights: Annotated[
        bool,
        typer.Option(
            "--no-weights",
            help="With --package: record the source spec and the weights' sha256 instead of "
            "the weights (for weights you may not redistribute).",
        ),
    ] = False,
    allow_fail: Annotated[
        bool,
        typer.Option(
            "--allow-fail",
            help="With --package: a port whose verdict is FAIL is to be published anyway; its "
            "card then says so under the title.",
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """The whole proof of a port in one command, in the form of the hand-written reports.

    Runs infer, bench and compare (with --localize and --try-fixes) and writes into --out:
    README.md (verdict first, then environment, weights, dependencies, inference sample,
    performance by batch size with MFU, accuracy with noise floor, fixes before/after, error by
    block, notes), report.json (every number), PNG plots, the raw JSON of each step and a log.
    With --package, --out also becomes a port that vitport load, compare and publish take.
    """
    from vitport.bench.configure import check_budget
    from vitport.bench.run import Window
    from vitport.compare.check import open_source
    from vitport.device import Device
    from vitport.outputs import check_dir, is_report_dir
    from vitport.report import (
        LANGS,
        ReportOptions,
        RunLog,
        read_report,
        run_report,
        write_report,
    )
    from vitport.report.render import headline
    from vitport.report.strings import STRINGS

    if lang not in LANGS:
        raise VitportError(f"--lang {lang} is not available; choose one of {', '.join(LANGS)}")
    check_dir(out, "out", overwrite, is_report_dir)
    for name, given in (("--no-weights", no_weights), ("--allow-fail", allow_fail)):
        if given and not package:
            raise VitportError(f"{name} applies to --package; add --package")
    if from_json is not None:
        if package:
            raise VitportError("--package writes a port from a run; drop --from")
        path = write_report(read_report(from_json), out, lang)
        console.print(f"report re-rendered: [bold]{esc(path)}[/bold]")
        return
    if model is None:
        raise VitportError("vitport report needs --model SPEC (or --from DIR/report.json)")
    seconds = check_budget(budget, optimize)
    sizes = parse_batch_sizes(batch_sizes)
    port, _ = port_options(model, dtype, fix, weights, show=True)
    source = open_source(golden if golden is not None else reference)
    gold = None if isinstance(source, Device) else source
    if package:
        from vitport.port.package import check_reference

        check_reference(source)
    loaded, _ = read_inputs(images, image_size or 224, gold)
    enable_cuda_shim(cuda_shim)
    with progress(f"report on {esc(model)}", elapsed=True) as activity:
        log = RunLog(echo=lambda m: activity.update(esc(m)))
        options = ReportOptions(
            spec=model,
            device=device,
            dtype=port.dtype,
            reference=reference,
            reference_dtype=reference_dtype,
            batch_sizes=tuple(sizes) if sizes else None,
            window=Window(min_seconds=min_seconds),
            fixes=port.fixes,
            image_size=image_size,
            weights=str(weights) if weights else None,
            trust_remote_code=trust_remote_code,
            optimize=optimize,
            budget=seconds,
        )
        run = run_report(options, loaded, gold, log)
        if package:
            from vitport.port.package import write_package

            activity.update("writing the package")
            port = write_package(
                run,
                out,
                lang,
                include_weights=not no_weights,
                allow_fail=allow_fail,
                overwrite=overwrite,
            )
    data = run.data
    path = write_report(data, out, lang) if not package else out / "README.md"
    for line in headline(data, STRINGS[lang]):
        console.print(line.replace("**", ""))
    console.print(f"report written: [bold]{esc(path)}[/bold]")
    if package:
        size = sum(port.files.values())
        weights = "with its weights" if port.manifest.weights_included else "without weights"
        console.print(
            f"port packaged {weights}: [bold]{esc(out)}[/bold] ({len(port.files)} files, "
            f"{size / 1e6:.1f} MB)"
        )
