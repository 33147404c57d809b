"""`convert`: a checkpoint into another layout (transformers, timm) or ONNX, proven to compute the
same function as its source before anything is written.

    result = vitport.convert.convert("./dinov2_vits14_pretrain.pth", "hf", "out/dinov2-small")
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitport.convert.engine import ConversionError, Converted, apply
from vitport.convert.result import ConversionResult, Source, VerificationFailed
from vitport.convert.tables import dropped_groups, table_for
from vitport.encoder import Architecture, Encoder
from vitport.errors import SpecError
from vitport.families.base import convertible_titles
from vitport.format import limit, metric_value
from vitport.outputs import write_atomic


def open_source(
    source: str,
    workdir: Path,
    from_layout: str | None = None,
    arch: str | None = None,
    trust_remote_code: bool = False,
    weights: Path | None = None,
    image_size: int | None = None,
) -> Source:
    """Read SOURCE (a spec, a directory or a checkpoint file) and load its own function: a model
    vitport loads comes at its checkpoint's own position grid, or resampled to `image_size`."""
    import vitport
    from vitport.convert.layouts import (
        detect_layout,
        file_sha256,
        foreign_arch,
        foreign_preprocessing,
        layout_names,
        loaded_arch,
        loaded_preprocessing,
        loaded_state,
        read_json,
        weights_file,
    )
    from vitport.families.base import foreign_layouts
    from vitport.families.weights import read_weights

    layouts = layout_names()
    if from_layout is not None and from_layout not in layouts:
        raise SpecError(
            f"from_layout={from_layout}: unknown layout; use one of {', '.join(layouts)}",
            params=("from_layout=",),
        )
    path = Path(source).expanduser()
    config: dict[str, Any] = {}
    file: Path | None = None
    if path.is_file():
        file = path
    elif path.is_dir():
        config = read_json(path / "config.json")
        foreign = any(layout.recognise(config) for layout in foreign_layouts())
        if foreign or not config:
            file = weights_file(path)
            if file is None:
                raise SpecError(f"{path} holds no checkpoint (.safetensors, .bin or .pth)")
    if file is not None and weights is not None:
        raise SpecError(
            f"weights=... is for timm:NAME sources; {source} carries its own weights",
            params=("weights=...",),
        )
    if file is not None:
        state = read_weights(file)
        layout = from_layout or detect_layout(state)
        if layout in ("hf", "timm"):
            raise SpecError(
                f"{file} is a bare {layout} checkpoint; pass its directory (with config.json)"
                + (" or use timm:NAME weights=FILE" if layout == "timm" else ""),
                params=("weights=",),
            )
        desc = foreign_arch(layout, state, config, arch)
        pre = foreign_preprocessing(layout, desc)
        where = Path(workdir) / "source-as-timm"

        def load_function() -> Encoder:
            from vitport.convert.layouts import write_foreign_as_timm

            write_foreign_as_timm(where, desc, state, pre)
            return vitport.load(str(where), "cpu", "fp32", fixes=(), image_size=image_size)

        processor = path / "preprocessor_config.json" if path.is_dir() else None
        return Source(
            spec=source,
            layout=layout,
            arch=desc,
            state=state,
            load_function=load_function,
            sha256=file_sha256(file),
            preprocessing=pre,
            processor_file=processor if processor and processor.is_file() else None,
        )
    encoder = vitport.load(  # a port converts as its weights are: fp32, no fixes
        source,
        "cpu",
        "fp32",
        fixes=(),
        image_size=image_size,
        weights=weights,
        trust_remote_code=trust_remote_code,
    )
    layout = "timm" if encoder.family == "timm" else "hf"
    if from_layout is not None and from_layout != layout:
        raise SpecError(
            f"{source} loads as a {layout} checkpoint, not from_layout={from_layout}",
            params=("from_layout=",),
        )
    try:
        desc = loaded_arch(encoder)
    except SpecError:
        desc = None  # not convertible between layouts; ONNX export still works
    if arch and desc is not None:
        desc = _with_heads(desc, arch)
    weights = weights or _weights_of(source)
    return Source(
        spec=source,
        layout=layout,
        arch=desc,
        state=loaded_state(encoder),
        load_function=lambda: encoder,
        sha256=file_sha256(weights) if weights else f"weights:{encoder.weights_sha256}",
        preprocessing=loaded_preprocessing(encoder),
    )


def _weights_of(spec: str) -> Path | None:
    """The weights file behind a local or demo spec, for its hash; None for hub and timm names."""
    from vitport.convert.layouts import weights_file
    from vitport.families import resolve

    if spec.startswith("demo:"):
        return weights_file(Path(resolve(spec)[1]))
    path = Path(spec).expanduser()
    return weights_file(path) if path.is_dir() else None


def _with_heads(arch: Architecture, name: str) -> Architecture:
    from dataclasses import replace

    from vitport.families.base import timm_heads

    return replace(arch, num_heads=timm_heads(name))


def convert(
    source: str,
    to: str,
    out: str | Path,
    *,
    from_layout: str | None = None,
    arch: str | None = None,
    image_size: int | None = None,
    weights: str | Path | None = None,
    overwrite: bool = False,
    opset: int = 18,
    static: bool = False,
    batch_size: int = 1,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] = lambda _: None,
    mapping_override: Any = None,
) -> ConversionResult:
    """Convert SOURCE to `to` (hf, timm or onnx) in directory `out`, verified before it is written.

    `weights`: a local weights file for a timm:NAME source. The source runs at its checkpoint's
    own position grid; `image_size` resamples it, and the result records that change of function.
    With `to="onnx"`, an `out` ending in .onnx is the model file itself, with its preprocessing
    and record beside it (NAME.preprocessor_config.json, NAME.conversion.json).
    `mapping_override` replaces the table (tests plant a broken one with it)."""
    from vitport.convert.layouts import TARGETS
    from vitport.inputs import default_inputs

    if to not in TARGETS:
        raise SpecError(f"to={to}: use one of {', '.join(TARGETS)}", params=("to=",))
    out = Path(out).expanduser()
    weights = Path(weights).expanduser() if weights is not None else None
    as_file = to == "onnx" and out.suffix == ".onnx"
    check_out(out, overwrite, as_file)
    # The work files (a source rewritten on the way) live in a scratch directory; the result
    # is written beside `out` and moved into place, over an old one, only once verified.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.partial-", dir=_parent(out)) as work:

        def produce(result_dir: Path) -> ConversionResult:
            progress(f"reading {source}")
            src = open_source(
                source, Path(work), from_layout, arch, trust_remote_code, weights, image_size
            )
            if to == "onnx":
                from vitport.convert.onnx import export_onnx

                result = export_onnx(
                    src, result_dir, image_size, opset, static, batch_size, progress
                )
            else:
                result = _convert_layout(
                    src,
                    to,
                    result_dir,
                    arch,
                    image_size,
                    progress,
                    mapping_override,
                    default_inputs,
                )
            result.out = str(out)
            result.notes[:0] = [n for n in src.function.notes if "resampled" not in n]
            if image_size is not None:  # asked for: the converted checkpoint is resampled
                _record_resampling(result, src.function)
            if not result.passed:
                raise VerificationFailed(_failure_line(result), result)
            return result

        if as_file:
            return _write_onnx_file(out, Path(work) / "onnx", produce)

        def write(result_dir: Path) -> ConversionResult:
            result = produce(result_dir)
            (result_dir / "conversion.json").write_text(json.dumps(result.to_dict(), indent=2))
            result.files = sorted(p.name for p in result_dir.iterdir())
            (result_dir / "conversion.json").write_text(json.dumps(result.to_dict(), indent=2))
            return result

        return write_atomic(out, write)


def _record_resampling(result: ConversionResult, function: Encoder) -> None:
    """A source loaded at another grid than its checkpoint's is another function: say so."""
    if function.resampled_from is None:
        return
    side = function.resampled_from[0]
    grid = function.image_size[0] // function.layout.patch_size
    result.resampled = {
        "from_grid": [side, side],
        "to_grid": [grid, grid],
        "image_size": function.image_size[0],
    }
    result.notes.append(
        f"--image-size {function.image_size[0]} resampled the checkpoint's {side}x{side} position "
        f"embeddings to {grid}x{grid}: the result computes that resampled function, not the "
        "checkpoint's own"
    )


def sidecars(out: Path) -> dict[str, Path]:
    """The files written beside an ONNX file --out: its preprocessing and its record."""
    return {
        "preprocessor_config.json": out.with_name(f"{out.stem}.preprocessor_config.json"),
        "conversion.json": out.with_name(f"{out.stem}.conversion.json"),
    }


def _write_onnx_file(
    out: Path, scratch: Path, produce: Callable[[Path], ConversionResult]
) -> ConversionResult:
    """--out NAME.onnx: the model file there, its preprocessing and record beside it, each
    written atomically; the record first, so that a run cut short leaves files vitport owns."""
    import shutil

    from vitport.outputs import OutputError

    result = produce(scratch)
    produced = sorted(p.name for p in scratch.iterdir())
    if produced != ["model.onnx", "preprocessor_config.json"]:
        raise OutputError(
            f"the ONNX export keeps its weights in separate files ({len(produced) - 2} of them: "
            f"the model is over 2 GB); give a directory out=... instead of {out}",
            params=("out=...",),
        )
    beside = sidecars(out)
    result.files = sorted([out.name, *(p.name for p in beside.values())])
    record = json.dumps(result.to_dict(), indent=2)
    write_atomic(beside["conversion.json"], lambda tmp: tmp.write_text(record))
    write_atomic(
        beside["preprocessor_config.json"],
        lambda tmp: shutil.copyfile(scratch / "preprocessor_config.json", tmp),
    )
    write_atomic(out, lambda tmp: shutil.move(scratch / "model.onnx", tmp))
    return result


def _parent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def check_out(out: Path, overwrite: bool, as_file: bool = False) -> None:
    """Refuse an existing output unless told to replace it and it is vitport's own (a conversion
    directory, or an ONNX file with its record beside it); never the working directory or one
    of its parents."""
    from vitport.outputs import OutputError, check_dir, check_file, is_vitport_json

    if as_file:
        record = sidecars(out)["conversion.json"]
        owned = is_vitport_json(record)
        for path in (out, *sidecars(out).values()):
            if path.exists() and not overwrite:
                raise OutputError(
                    f"{path} already exists; choose another out=... or pass overwrite=True",
                    params=("out=...", "overwrite=True"),
                )
            if path.exists() and not path.is_dir() and not owned:
                raise OutputError(
                    f"{path} exists and vitport did not write it (no {record.name} beside it); "
                    "choose another out=...",
                    params=("out=...",),
                )
            check_file(path, "out", overwrite=True)
        return
    if out.exists() and not overwrite:
        raise OutputError(
            f"{out} already exists; choose another out=... or pass overwrite=True",
            params=("out=...", "overwrite=True"),
        )
    if out.exists() and Path.cwd().resolve().is_relative_to(out.resolve()):
        raise OutputError(
            f"out={out} holds the working directory; choose another out=...",
            params=("out=", "out=..."),
        )
    if out.is_dir() and any(out.iterdir()) and not (out / "conversion.json").is_file():
        raise OutputError(
            f"out={out} holds files vitport did not write (no conversion.json); overwrite=True "
            "replaces only an earlier conversion, never other files: choose a new or empty "
            "directory",
            params=("out=",),
        )
    if out.is_dir():
        check_dir(out, "out", overwrite=True)
    elif out.exists():
        raise OutputError(
            f"out={out} is a file; give a directory (or, with to='onnx', a NAME.onnx file)",
            params=("out=", "to='onnx'"),
        )
    else:
        check_dir(out, "out", overwrite)


def _failure_line(result: ConversionResult) -> str:
    failed = next(c for c in result.checks if not c.passed)
    checks = failed.judgement.verdict.failures or failed.judgement.verdict.checks
    first = checks[0] if checks else None
    what = (
        f"{first.group}.{first.metric} = {metric_value(first.metric, first.value)}, "
        f"limit {limit(first.metric, first.limit)}"
        if first
        else ""
    )
    where = f"; {result.notes[-1]}" if result.notes else ""
    return (
        f"the converted model does not compute the source's function ({failed.label}: {what})"
        f"{where}; nothing was written"
    )


def _convert_layout(
    src: Source,
    to: str,
    directory: Path,
    arch_name: str | None,
    image_size: int | None,
    progress: Callable[[str], None],
    mapping_override: Any,
    default_inputs: Callable,
) -> ConversionResult:
    import vitport
    from vitport.compare.sides import pixel_batches
    from vitport.convert.layouts import expected_shapes, write_checkpoint
    from vitport.convert.verify import compare_functions, culprit, run_features

    if src.arch is None:
        raise SpecError(
            f"vitport converts {convertible_titles()} between layouts; {src.spec} is "
            f"{src.function.family} (to='onnx' works for any model)",
            params=("to='onnx'",),
        )
    if to == src.layout:
        raise SpecError(f"{src.spec} is already in the {to} layout; nothing to convert")
    table = mapping_override or table_for(src.layout, to, src.arch.family)
    if table is None:
        raise SpecError(
            f"no mapping from {src.layout} to {to} for {src.arch.family}; vitport converts "
            "aimv2-apple and dinov2-hub to hf, and timm <-> hf for DINOv2 and ViT"
        )
    timm_name = arch_name if to == "timm" else None
    progress(f"mapping {len(src.state)} tensors with {table.name}")
    expected = expected_shapes(to, src.arch, timm_name)
    converted: Converted = apply(table, src.state, expected)
    write_checkpoint(
        directory,
        to,
        src.arch,
        converted.tensors,
        src.preprocessing,
        timm_name,
        src.processor_file if to == "hf" else None,
    )

    size = image_size or src.arch.image_size
    progress(f"verifying: the {to} checkpoint against the source at {size}px")
    target = vitport.load(str(directory), "cpu", "fp32", fixes=(), image_size=size)
    images = default_inputs(size)
    pixels = list(pixel_batches(target, images, 4))
    reference = run_features(src.function, pixels)
    output = run_features(target, pixels)
    groups = dropped_groups()
    skipped = {groups[r]: r for r in set(converted.dropped.values()) if r in groups}
    check = compare_functions(to, reference, output, skipped, 4)
    result = ConversionResult(
        source=src.spec,
        source_sha256=src.sha256,
        source_layout=src.layout,
        target=to,
        out="",
        family=src.arch.family,
        arch=src.arch.to_dict(),
        table=table.name,
        table_version=table.version,
        dropped=converted.dropped,
        filled=converted.filled,
        inputs=[im.name for im in images],
        image_size=size,
        checks=[check],
    )
    if not check.passed:
        progress("localising the difference")
        result.notes.append(culprit(src.function, target, pixels, converted.origin))
    return result


__all__ = ["ConversionError", "ConversionResult", "VerificationFailed", "convert"]
