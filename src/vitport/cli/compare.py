"""`vitport compare`: the device's output against a reference, with the noise floor."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer

from vitport.cli.app import (
    CudaShimOpt,
    DeviceOpt,
    DtypeOpt,
    FixOpt,
    ImagesArg,
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
from vitport.cli.display import progress, show, steps
from vitport.cli.inputs import load_model, port_options, read_inputs
from vitport.errors import VitportError

ACCURACY_DROP = (
    "mse",
    "vec rel worst (%)",
    "cos mean",
    "floor rel err (%)",
    "max abs",
    "rel err mean (%)",
)


def compare(
    model: ModelOpt,
    images: ImagesArg = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    reference: Annotated[
        str | None,
        typer.Option(
            "--reference",
            "-r",
            help="A device to run the reference on in this process (cpu, cuda, ...), a golden "
            "features file written by `vitport infer --out` on another machine, or an msprobe "
            "tensor dump (its dump_path, step*/ or rank*/proc*/ folder; L0 or mix), whose own "
            "inputs are then used. Default: a port's own golden file (its vitport.json), else "
            "cpu.",
        ),
    ] = None,
    reference_dtype: Annotated[
        str, typer.Option(help="dtype of an in-process reference: fp32, fp64, fp16 or bf16.")
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
            help="Override a limit: METRIC=VALUE or GROUP.METRIC=VALUE (repeatable); "
            "relative errors and agreements as a fraction or in % (rel_error=0.02 or 2%).",
        ),
    ] = None,
    inject_fault: Annotated[
        str | None,
        typer.Option(
            help="Plant a known fault KIND@BLOCK in the candidate (gelu-tanh@7, "
            "layernorm-bf16@3, mlp-scale@5, norm-swap@2) to check that localisation and fixes "
            "find it."
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
    runtime: RuntimeOpt = "torch",
) -> None:
    """Is the port faithful? The device's output against a reference, with the noise floor.

    Metrics per output group (CLS, registers, patches, pooled, logits): relative error (the mean
    absolute difference over the mean absolute reference value), vector relative error, max/mean abs, MSE, cosine per token,
    top-1/top-5 of logits, nearest-neighbour agreement of pooled features; beside each, the
    noise floor of the candidate's dtype: fp32 against fp64 on the CPU for fp32, and for
    fp16/bf16 the error of rounding the weights and input to that dtype alone. Exit code 0 when
    every threshold passes, 1 when one fails: it can gate CI.
    """
    import json

    from vitport.compare.check import assemble_check, open_source
    from vitport.compare.run import candidate_factory, run_check
    from vitport.compare.verdict import parse_threshold_overrides, unused_limits
    from vitport.device import Device, parse_dtype, resolve_device
    from vitport.faults import parse_fault
    from vitport.fixes import fix_names
    from vitport.outputs import check_file, is_vitport_json, write_text
    from vitport.runtimes import Setup, check

    try:
        overrides = parse_threshold_overrides(threshold or [])
    except ValueError as exc:
        raise VitportError(str(exc)) from exc
    check_file(json_out, "json", overwrite, is_vitport_json)
    if inject_fault:
        parse_fault(inject_fault)
    port, found = port_options(model, dtype, fix, weights)
    fixes = list(port.fixes)
    reference, reference_note = port_reference(reference, found)
    source = open_source(reference, localize)
    golden = None if isinstance(source, Device) else source
    target = resolve_device(device)
    cand_dtype = parse_dtype(port.dtype)
    setup = Setup(runtime, port.dtype)
    check(setup, target.type)  # the runtime refused before anything loads
    ref_dtype = parse_dtype(reference_dtype)

    loaded, problems = read_inputs(images, image_size or 224, golden)
    base = load_model(model, "cpu", Setup(), image_size, weights, trust_remote_code, cuda_shim)

    if runtime != "torch" and localize:
        raise VitportError(
            f"--localize hooks the torch modules, which {runtime} does not run; compare "
            f"--runtime {runtime} without --localize, or localise with --runtime torch"
        )
    make_candidate = candidate_factory(base, target, setup, inject_fault)
    candidate, detail = make_candidate(fixes)
    notes = [*base.notes, *([port.note] if port.note else []), *reference_note]
    notes += [f"candidate: {detail}"] if detail else []
    if problems:
        from vitport.inputs import skipped_summary

        notes.append(f"{len(loaded)} inputs compared, {skipped_summary(problems)}: listed above")
    with progress("reading the reference ...") if golden is not None else nullcontext():
        plan = assemble_check(
            base,
            source,
            cand_dtype,
            inputs=loaded,
            overrides=overrides,
            reference_dtype=ref_dtype,
            part_reference=resolve_device(part_reference, param="part_reference")
            if golden and localize
            else None,
        )
    trials = [(name,) for name in fix_names()] if try_fixes else []
    with progress("comparing ...") as activity:
        result = run_check(
            base,
            candidate,
            plan,
            localize=localize,
            trials=trials,
            make_candidate=make_candidate,
            fixes=fixes,
            batch_size=batch_size,
            progress=steps(activity),
            notes=notes,
        )
    for t in unused_limits(overrides, result.groups):
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


def port_reference(reference: str | None, found) -> tuple[str, list[str]]:
    """--reference as given; else a port's own golden file (and a note naming it), else cpu."""
    if reference is not None:
        return reference, []
    if found is None:
        return "cpu", []
    manifest, home = found
    golden = home / manifest.golden
    if not golden.is_file():
        raise VitportError(
            f"the port {home} has no golden file {manifest.golden} beside its vitport.json; "
            "give --reference DEVICE or FILE, or package the port again"
        )
    return str(golden), [f"reference: the port's own golden file {golden} (from its vitport.json)"]


def render_compare(result, per_input: bool = False) -> None:
    import vitport.cli.tables as tables

    show(tables.accuracy_table(result), ACCURACY_DROP)
    if per_input:
        show(tables.per_input_table(result))
    for line in tables.task_lines(result):
        console.print(line)
    console.print(
        f"[dim]floor = {esc(result.floor_kind)}; x floor = how many times that floor this error "
        "is.[/dim]"
    )
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {esc(note)}")
    if result.localization is not None:
        show(tables.localization_table(result), ("accumulated (%)",))
        loc = result.localization
        if loc.culprit:
            console.print(
                f"[bold]first diverging point:[/bold] {esc(loc.culprit)}: {esc(loc.reason)}"
            )
        else:
            console.print(f"[bold]no single culprit:[/bold] {esc(loc.reason)}")
    if result.trials:
        show(tables.trials_table(result))
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
    console.print(tables.verdict_text(result))
