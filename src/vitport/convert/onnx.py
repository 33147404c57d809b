"""Any loadable model to ONNX, as vitport runs it, verified with onnxruntime."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vitport.compare.sides import pixel_batches
from vitport.convert.result import ConversionResult
from vitport.convert.verify import compare_functions, run_features
from vitport.encoder import Features
from vitport.errors import VitportError
from vitport.runtimes.onnx import INPUT, export_graph

if TYPE_CHECKING:
    from vitport.convert.result import Source

VERIFY_BATCH = 5  # the second batch size a dynamic export is verified at (besides 1)


def export_onnx(
    src: Source,
    directory: Path,
    image_size: int | None,
    opset: int,
    static: bool,
    batch_size: int,
    progress: Callable[[str], None],
) -> ConversionResult:
    import onnxruntime as ort

    from vitport.inputs import DEFAULT_PHOTOS, DEFAULT_RANDOM, default_inputs

    inputs = DEFAULT_PHOTOS + DEFAULT_RANDOM
    if static and batch_size > inputs:
        raise VitportError(
            f"static=True batch_size={batch_size}: the proof runs on the {inputs} default "
            "inputs, so a static batch can be at most that; export a smaller batch",
            params=("static=True", "batch_size="),
        )
    encoder = src.function  # a model vitport loads comes at image_size already
    if image_size is not None and image_size != encoder.image_size[0]:
        raise VitportError(
            f"image_size={image_size} for a foreign checkpoint: convert it to hf first, then "
            "export that",
            params=("image_size=",),
        )
    size = encoder.image_size
    images = default_inputs(size[0])
    probe = encoder.encode(encoder.preprocess([images[0].image]))
    groups = list(probe.groups())
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    progress(f"exporting {', '.join(groups)} at {size[0]}x{size[1]} (opset {opset})")
    export_graph(
        encoder, path, groups=groups, opset=opset, static_batch=batch_size if static else None
    )
    replace(src.preprocessing, size=size[0]).hf_processor().save_pretrained(str(directory))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    checks = []
    sizes = [batch_size] if static else [1, VERIFY_BATCH]
    usable = images[: len(images) // batch_size * batch_size] if static else images
    for batch in sizes:
        progress(f"verifying with onnxruntime at batch {batch}")
        pixels = list(pixel_batches(encoder, usable, batch))
        reference = run_features(encoder, pixels)
        outputs = [session.run(groups, {INPUT: p.numpy()}) for p in pixels]
        tensors = {
            name: torch.cat([torch.from_numpy(o[i]) for o in outputs])
            for i, name in enumerate(groups)
        }
        onnx_feats = Features(grid=reference.grid, **tensors)
        checks.append(compare_functions(f"onnx b={batch}", reference, onnx_feats, batch_size=batch))
    notes = (
        [f"static export: batch {batch_size} and {size[0]}x{size[1]} are fixed"] if static else []
    )
    return ConversionResult(
        source=src.spec,
        source_sha256=src.sha256,
        source_layout=src.layout,
        target="onnx",
        out="",
        family=src.arch.family if src.arch else encoder.family,
        arch={
            **(src.arch.to_dict() if src.arch else {}),
            "opset": opset,
            "static": static,
            "outputs": groups,
            "input": INPUT,
        },
        inputs=[im.name for im in usable],
        image_size=size[0],
        checks=checks,
        notes=notes,
    )
