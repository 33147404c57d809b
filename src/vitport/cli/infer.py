"""`vitport infer`: run a model on images, show what came out, optionally save a golden file."""

from __future__ import annotations

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
    WeightsOpt,
    console,
    esc,
)
from vitport.cli.display import progress, show
from vitport.cli.inputs import find_inputs, load_model, port_options, report_problems
from vitport.errors import VitportError
from vitport.format import count


def infer(
    model: ModelOpt,
    images: ImagesArg = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Save the Features (safetensors + metadata) to this file; with --format msprobe, "
            "this folder receives an msprobe dump."
        ),
    ] = None,
    out_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="What --out holds: vitport (a golden features file) or msprobe (an L0 tensor "
            "dump of every module call, in msprobe's layout, that `msprobe compare` reads).",
        ),
    ] = "vitport",
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
        int,
        typer.Option(
            min=1,
            help="Refuse, before writing, a --with-blocks file or an msprobe dump that would be "
            "larger than this many bytes.",
        ),
    ] = 2_000_000_000,
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
    from vitport.cli.infer_tables import latency_note, per_image_table, shapes_table
    from vitport.infer import infer as run_infer
    from vitport.infer import infer_inputs
    from vitport.inputs import default_inputs, read_images
    from vitport.inputs.stream import file_inputs
    from vitport.outputs import check_dir, check_file, is_features_file

    if out_format not in ("vitport", "msprobe"):
        raise VitportError(f"--format {out_format} is not known; choose vitport or msprobe")
    if out_format == "msprobe":
        from vitport.msprobe import is_dump

        if out is None:
            raise VitportError(
                "--format msprobe writes a dump into the --out folder; add --out DIR"
            )
        check_dir(out, "out", overwrite, is_dump)
    else:
        check_file(out, "out", overwrite, is_features_file)
    if with_blocks and out is None:
        raise VitportError("--with-blocks stores block states in the --out file; add --out FILE")
    paths, skipped = find_inputs(images)
    from vitport.runtimes import Setup

    port, _ = port_options(model, dtype, fix, weights)
    setup = Setup(dtype=port.dtype, fixes=port.fixes)
    encoder = load_model(
        model, device, setup, image_size, weights, trust_remote_code, cuda_shim, note=port.note
    )
    if paths is None:
        loaded = default_inputs(encoder.image_size[0])
        result = run_infer(encoder, loaded, batch_size)
    else:
        with progress("encoding", bar=True, stderr=True) as activity:
            result = infer_inputs(
                encoder, file_inputs(paths), batch_size, workers, activity.tick, skipped
            )
        report_problems(result.problems[len(skipped) :])
    problems = result.problems
    feats = result.features
    h, w = encoder.image_size

    show(shapes_table(model, encoder, feats))
    console.print(
        f"[dim]{encoder.family}, {encoder.num_params / 1e6:.1f}M parameters, tokens: "
        f"{encoder.layout.describe(h, w)}; source: {encoder.source}[/dim]"
    )
    for note in [*encoder.notes, *result.notes]:
        console.print(f"[yellow]note:[/yellow] {esc(note)}")
    show(per_image_table(result), ("pooled[:4]", "size"))
    console.print(f"[dim]{latency_note(result, encoder.load_seconds)}[/dim]")
    if out is not None and out_format == "msprobe":
        from vitport.msprobe.write import check_dump_size, write_dump

        recorded = min(block_images or len(feats.names), len(feats.names))
        check_dump_size(encoder, recorded, batch_size, max_bytes)
        chosen = loaded[:recorded] if paths is None else read_images(feats.names[:recorded])[0]
        batches = (
            encoder.preprocess([im.image for im in chosen[i : i + batch_size]])
            for i in range(0, len(chosen), batch_size)
        )
        with progress("writing the msprobe dump ..."):
            folder = write_dump(encoder, batches, out)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        console.print(
            f"msprobe dump of {count(len(chosen), 'image')} written to [bold]{esc(folder)}[/bold] "
            f"({size / 1e6:.1f} MB); msprobe compare --target_path {esc(out)}/step0 "
            "--golden_path OTHER/step0 reads it"
        )
    elif out is not None:
        from vitport.golden import golden_file_parts, record_run

        record_run(feats, problems, result.content_sha256, encoder.device)
        extra, header = {}, {}
        if with_blocks:
            with progress("recording block states ..."):
                recorded = block_images or len(feats.names)
                chosen = (
                    loaded[:recorded] if paths is None else read_images(feats.names[:recorded])[0]
                )
                extra, header = golden_file_parts(
                    encoder, chosen, batch_size, blocks_fp32, max_bytes
                )
        path = feats.save(out, extra, header)
        size = path.stat().st_size
        blocks = f", with block states at {len(extra)} points" if extra else ""
        console.print(f"features saved to [bold]{esc(path)}[/bold] ({size / 1e6:.1f} MB{blocks})")
    broken = feats.nonfinite_groups()
    if broken:
        console.print(
            f"[yellow]warning:[/yellow] the {', '.join(broken)} output holds NaN or inf; "
            "check the dtype (fp16 overflows above 65504) or compare it: vitport compare"
        )
    if problems:
        from vitport.inputs import skipped_summary

        console.print(
            f"{count(len(feats.names), 'image')} encoded, "
            f"[yellow]{skipped_summary(problems)}[/yellow]: listed above"
        )
        if strict:
            raise typer.Exit(1)
