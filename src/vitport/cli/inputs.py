"""What most commands read: the model (with --cuda-shim and --fix) and the images."""

from __future__ import annotations

from pathlib import Path

from vitport.cli.app import errors, esc
from vitport.cli.display import progress
from vitport.errors import HubUnreachableError, VitportError


def enable_cuda_shim(wanted: bool) -> None:
    """--cuda-shim: forward torch.cuda to the NPU before anything loads, and say so."""
    if wanted:
        from vitport.device import enable_cuda_shim as enable

        errors.print(f"[dim]{enable()}[/dim]")


def load_model(
    spec: str,
    device: str,
    setup,
    image_size: int | None,
    weights: Path | None,
    trust_remote_code: bool,
    cuda_shim: bool,
    batch_sizes=None,
    note: str = "",
):
    """Shared by every command: the shim first, then the one door, vitport.runtimes.load (the
    runtime checked, and `batch_sizes` against its limits, before the model loads; then the
    fixes and the runtime's build). `setup` is a vitport.runtimes.Setup; `note` (a port's, from
    port_options) joins the encoder's notes."""
    from vitport.runtimes import load, runner

    enable_cuda_shim(cuda_shim)
    runner(setup.runtime).limits.check_batches(setup.runtime, batch_sizes)
    with progress(f"loading {esc(spec)} ..."):
        prepared = load(
            spec,
            device,
            setup,
            image_size=image_size,
            weights=weights,
            trust_remote_code=trust_remote_code,
        )
    for report in prepared.fix_reports:
        errors.print(f"[dim]fix {report.name}: {esc(report.detail)}[/dim]", soft_wrap=True)
    if note:
        prepared.encoder.notes.append(note)
    return prepared.encoder


def port_options(
    spec: str, dtype: str | None, fix: str | None, weights: Path | None = None, show: bool = False
):
    """--dtype and --fix as given, else a port's own (its vitport.json), else fp32 and no fixes:
    a vitport.port.settings.PortSettings, whose note (for a port) the command shows, and the
    port's (manifest, directory), or None. A hub spec is fetched here, as loading would; a spec
    that does not resolve is left for the load to refuse, after the command's own checks.
    `show`: print the note now (for commands whose encoder is not at hand)."""
    from vitport.families import find_port
    from vitport.fixes import parse_fixes
    from vitport.port.settings import CLI_OVERRIDE, port_settings

    fixes = None if fix is None else parse_fixes(fix)
    if spec.startswith(("demo:", "timm:")):
        return port_settings(None, dtype, fixes), None
    try:
        with progress(f"reading {esc(spec)} ..."):
            found = find_port(spec, weights is not None)
    except HubUnreachableError:
        raise
    except VitportError:
        found = None
    settings = port_settings(found[0] if found else None, dtype, fixes, CLI_OVERRIDE)
    if show and settings.note:
        errors.print(f"[yellow]note:[/yellow] {esc(settings.note)}", soft_wrap=True)
    return settings, found


def report_problems(problems) -> None:
    for problem in problems:
        errors.print(
            f"[yellow]skipped[/yellow] {esc(problem.name)}: {esc(problem.reason)}", soft_wrap=True
        )


def find_inputs(images: list[Path] | None) -> tuple[list[Path] | None, list]:
    """Before the model loads: the image files to read (directories expanded; None for the
    default inputs) and those already skipped (missing, not images), reported here."""
    from vitport.inputs import scan_images

    if not images:
        return None, []
    paths, skipped = scan_images(images)
    report_problems(skipped)
    return paths, skipped


def read_inputs(images: list[Path] | None, size: int, golden=None):
    """The user's images; else a golden file's own images; else the default set (real photos
    plus seeded random inputs). An msprobe dump brings its own pixel inputs (see
    vitport.compare.check.check_inputs)."""
    from vitport.compare.check import DUMP_BRINGS_INPUTS, check_inputs
    from vitport.inputs import read_images
    from vitport.msprobe import Dump

    loaded, problems = None, []
    if images:
        if isinstance(golden, Dump):
            raise VitportError(DUMP_BRINGS_INPUTS)
        loaded, problems = read_images(images)
        report_problems(problems)
        if not loaded:
            raise VitportError("none of the given images could be read; see the reasons above")
    inputs, missing = check_inputs(golden, loaded, size)
    report_problems(missing)
    return inputs, [*problems, *missing]
