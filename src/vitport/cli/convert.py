"""`vitport convert`: wiring of vitport.convert to the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitport.cli.app import ImageSizeOpt, RemoteCodeOpt, WeightsOpt, console, esc
from vitport.cli.display import progress, show, steps
from vitport.format import count


def convert(
    source: Annotated[
        str,
        typer.Argument(
            help="A model spec (hf:ORG/NAME, timm:NAME, demo:NAME, a local directory) or a "
            "checkpoint file or directory in a foreign layout (Apple AIMv2, DINOv2 torch-hub .pth)."
        ),
    ],
    to: Annotated[str, typer.Option("--to", help="Target: hf, timm or onnx.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Directory to write (atomically); with --to onnx, a NAME.onnx file instead.",
        ),
    ],
    from_layout: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Source layout: aimv2-apple, dinov2-hub, timm or hf; detected from the keys "
            "when left out.",
        ),
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            help="Architecture name (timm's, or DINOv2 torch-hub's such as dinov2_vitl14_reg): "
            "sets the head count of a checkpoint without config, and the timm architecture "
            "of a timm target."
        ),
    ] = None,
    image_size: ImageSizeOpt = None,
    weights: WeightsOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out.")
    ] = False,
    opset: Annotated[int, typer.Option(min=7, help="ONNX opset.")] = 18,
    static: Annotated[
        bool,
        typer.Option(
            "--static",
            help="ONNX with fixed batch and size (for runtimes that need static shapes, such "
            "as Ascend ATC); default: dynamic batch.",
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch of a --static ONNX export.")] = 1,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the conversion record here.")
    ] = None,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Convert a checkpoint to transformers, timm or ONNX, and prove it computes the same function.

    Apple's original AIMv2 and DINOv2's torch-hub release go to transformers (Aimv2VisionModel, Dinov2Model, Dinov2WithRegistersModel); DINOv2 and ViT go between timm and transformers; any model vitport loads goes to ONNX.

    Every source tensor is mapped or dropped with a reason, every target tensor filled, every shape checked before anything runs. Then the result and its source run on the default real inputs and are compared at fp32 limits (ONNX: onnxruntime at batch 1 and 5). A result that fails is never written.

    The source runs at its checkpoint's own position grid (read from its position embeddings, whatever its config says); --image-size resamples it, and conversion.json records that as a change of function.

    --out gets a directory that transformers or timm loads without vitport, with conversion.json recording the source, its sha256, the mapping and the proof. With --to onnx, --out NAME.onnx is the model file itself, with NAME.preprocessor_config.json and NAME.conversion.json beside it. Exit code 0 when written, 1 when the function changed, 2 for unusable input.
    """
    from vitport.cli.tables import conversion_table
    from vitport.convert import VerificationFailed
    from vitport.convert import convert as run_convert
    from vitport.outputs import check_file, is_vitport_json

    check_file(json_out, "json", overwrite, is_vitport_json)

    with progress("converting ...") as activity:
        try:
            result = run_convert(
                source,
                to,
                out,
                from_layout=from_layout,
                arch=arch,
                image_size=image_size,
                weights=weights,
                overwrite=overwrite,
                opset=opset,
                static=static,
                batch_size=batch_size,
                trust_remote_code=trust_remote_code,
                progress=steps(activity),
            )
        except VerificationFailed as exc:
            show(conversion_table(exc.result), ("max abs",))
            if json_out is not None:
                write_json(json_out, exc.result.to_dict())
            raise
    show(conversion_table(result), ("max abs",))
    console.print(
        f"[dim]{result.source_layout} -> {result.target} with {result.table or 'torch.onnx'}; "
        f"{count(len(result.dropped), 'tensor')} dropped, {len(result.filled)} filled[/dim]"
    )
    for name, why in sorted(result.dropped.items()):
        console.print(f"[dim]dropped {esc(name)}: {esc(why)}[/dim]", soft_wrap=True)
    for name, why in sorted(result.filled.items()):
        console.print(f"[dim]filled {esc(name)} with zeros: {esc(why)}[/dim]", soft_wrap=True)
    skipped = {g: why for c in result.checks for g, why in c.skipped.items()}
    for group, why in skipped.items():
        console.print(f"[dim]{group} not compared: {esc(why)}[/dim]", soft_wrap=True)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {esc(note)}")
    verdict = (
        "[green]same function[/green]"
        if result.same_function
        else ("[yellow]resampled function[/yellow] (verified against the resampled source)")
    )
    console.print(
        f"{verdict}: written to [bold]{esc(result.out)}[/bold] ({', '.join(result.files)})"
    )
    if json_out is not None:
        write_json(json_out, result.to_dict())


def write_json(path: Path, data: dict) -> None:
    import json

    from vitport.outputs import write_text

    write_text(path, json.dumps(data, indent=2))
