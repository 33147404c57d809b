"""Any loadable model to ONNX, as vitport runs it, verified with onnxruntime."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from vitport.compare.sides import pixel_batches
from vitport.convert.result import ConversionResult
from vitport.convert.verify import compare_functions, run_features
from vitport.encoder import Encoder, Features
from vitport.errors import VitportError, one_line
from vitport.runtimes.onnx import INPUT, register_symbolics

if TYPE_CHECKING:
    from vitport.convert.result import Source

VERIFY_BATCH = 5  # the second batch size a dynamic export is verified at (besides 1)


class EncoderGraph(nn.Module):
    """The encoder as one graph: pixels in, the Features groups out, in the contract's order."""

    def __init__(self, encoder: Encoder, groups: list[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.module = encoder.module
        self.groups = groups

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.encoder.forward_fn(self.module, pixels)
        feats = self.encoder.split(raw, pixels.shape[-2:])
        found = feats.groups()
        return tuple(found[name] for name in self.groups)


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
    example = torch.zeros(batch_size if static else 1, 3, *size)
    dynamic = None if static else {name: {0: "batch"} for name in (INPUT, *groups)}
    if opset >= 18:  # ONNX Resize antialiases and ReduceMean takes axes as input from 18
        register_symbolics()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                EncoderGraph(encoder, groups).eval(),
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT],
                output_names=groups,
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
            )
        except Exception as exc:  # the exporter raises many types
            raise VitportError(
                f"torch.onnx could not export {src.spec} at opset {opset} "
                f"({one_line(exc, typed=True)}); try another opset",
                params=("opset",),
            ) from exc
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
