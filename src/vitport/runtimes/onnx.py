"""The one ONNX export of an encoder: what onnxruntime and OpenVINO run (cached by weights,
fixes and size) and what `vitport convert --to onnx` writes. Holds the symbolics the
TorchScript exporter lacks."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vitport.encoder import Encoder, RawOutput
from vitport.errors import VitportError, one_line

INPUT = "pixel_values"


def _bicubic_antialiased(g, x, output_size, align_corners, scale_h=None, scale_w=None):
    """aten::_upsample_bicubic2d_aa (DINOv2-with-registers' position interpolation) as ONNX
    Resize: PyTorch's antialiased bicubic is Pillow's kernel (a = -0.5, outside taps excluded)."""
    from torch.onnx import symbolic_helper

    def const(values: list[int]):
        return g.op("Constant", value_t=torch.tensor(values))

    batch_channels = g.op("Slice", g.op("Shape", x), const([0]), const([2]))
    sizes = g.op("Concat", batch_channels, g.op("Cast", output_size, to_i=7), axis_i=0)
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    corners = symbolic_helper._maybe_get_const(align_corners, "b")
    return g.op(
        "Resize",
        x,
        empty,
        empty,
        sizes,
        mode_s="cubic",
        cubic_coeff_a_f=-0.5,
        antialias_i=1,
        exclude_outside_i=1,
        coordinate_transformation_mode_s="align_corners" if corners else "pytorch_half_pixel",
    )


def _rms_norm(g, x, normalized_shape, weight, eps):
    """aten::rms_norm (timm's AIMv2) for opsets before ONNX's RMSNormalization (23):
    x / sqrt(mean(x^2 over the normalised axes) + eps) * weight."""
    from torch.onnx import symbolic_helper

    dims = len(symbolic_helper._get_const(normalized_shape, "is", "normalized_shape"))
    eps = symbolic_helper._maybe_get_const(eps, "f")
    if eps is None or not isinstance(eps, float):
        eps = torch.finfo(torch.float32).eps
    axes = g.op("Constant", value_t=torch.tensor(list(range(-dims, 0))))
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes, keepdims_i=1)
    scale = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps))))
    out = g.op("Div", x, scale)
    return out if symbolic_helper._is_none(weight) else g.op("Mul", out, weight)


def register_symbolics() -> None:
    """Ops the TorchScript exporter lacks that vitport's families use."""
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, 18)
    torch.onnx.register_custom_op_symbolic("aten::_upsample_bicubic2d_aa", _bicubic_antialiased, 18)


class EncoderGraph(nn.Module):
    """The encoder's forward as one graph. Without `groups`: tokens, then pooled and logits where
    the family has them (what a runtime splits by the layout). With `groups`: those Features
    groups, in that order (the contract `vitport convert --to onnx` writes)."""

    def __init__(self, encoder: Encoder, groups: Sequence[str] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.module = encoder.module
        self.groups = list(groups) if groups else None

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.encoder.forward_fn(self.module, pixels)
        if self.groups is None:
            return tuple(t for t in (raw.tokens, raw.pooled, raw.logits) if t is not None)
        found = self.encoder.split(raw, pixels.shape[-2:]).groups()
        return tuple(found[name] for name in self.groups)


def export_graph(
    encoder: Encoder,
    path: Path,
    *,
    groups: Sequence[str] | None = None,
    opset: int = 18,
    static_batch: int | None = None,
) -> list[str]:
    """Export the encoder's forward (its module in fp32, on the CPU) to ONNX at `path`,
    atomically: `groups` as outputs (see EncoderGraph; else out0, out1, … of the raw forward),
    with a dynamic batch axis unless `static_batch` fixes it. Returns the output names."""
    from vitport.outputs import write_atomic

    if encoder.dtype != torch.float32 or encoder.device.type != "cpu":
        from vitport.device import resolve_device

        encoder = encoder.to(resolve_device("cpu"), torch.float32)
    example = torch.zeros(static_batch or 1, 3, *encoder.image_size)
    graph = EncoderGraph(encoder, groups).eval()
    if groups:
        names = list(groups)
    else:
        with torch.no_grad():
            names = [f"out{i}" for i in range(len(graph(example)))]
    if opset >= 18:  # ONNX Resize antialiases and ReduceMean takes axes as input from 18
        register_symbolics()
    dynamic = None if static_batch else {n: {0: "batch"} for n in (INPUT, *names)}

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                (example,),
                str(tmp),
                dynamo=False,
                input_names=[INPUT],
                output_names=names,
                opset_version=opset,
                do_constant_folding=True,
                dynamic_axes=dynamic,
            )

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(path, write)
    except Exception as exc:  # the exporter raises many types
        raise VitportError(
            f"torch.onnx could not export {encoder.spec} at opset {opset} "
            f"({one_line(exc, typed=True)}); try another opset",
            params=("opset",),
        ) from exc
    return names


def onnx_file(encoder: Encoder, cache: Path) -> Path:
    """The encoder exported to ONNX (its fp32 module, dynamic batch), cached by weights, fixes
    and size: one build serves every batch size and every runtime that reads ONNX."""
    h, w = encoder.image_size
    key = f"{encoder.weights_sha256[:16]}-{h}x{w}-{'+'.join(encoder.fixes) or 'plain'}"
    path = cache / "onnx" / key / "model.onnx"
    if not path.is_file():
        export_graph(encoder, path)
    return path


def raw_output(values: Sequence) -> RawOutput:
    """An exported graph's outputs (arrays or tensors: tokens, then pooled and logits where the
    graph has them) as the RawOutput a forward returns."""
    tensors = [v if isinstance(v, torch.Tensor) else torch.from_numpy(v) for v in values]
    names = ["tokens", "pooled", "logits"][: len(tensors)]
    return RawOutput(**dict(zip(names, tensors, strict=True)))
