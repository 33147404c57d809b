"""The encoder's forward as one ONNX graph: what onnxruntime and OpenVINO run, and what
`vitport convert --to onnx` exports. Holds the symbolics the TorchScript exporter lacks."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from vitport.encoder import Encoder
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


class RawGraph(nn.Module):
    """The encoder's forward as one graph: pixels in; tokens, then pooled and logits where the
    family has them."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.module = encoder.module

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.encoder.forward_fn(self.module, pixels)
        return tuple(t for t in (raw.tokens, raw.pooled, raw.logits) if t is not None)


def export_graph(encoder: Encoder, path: Path, opset: int = 18) -> Path:
    """Export the fp32 encoder's forward to ONNX with a dynamic batch axis, atomically."""
    from vitport.outputs import write_atomic

    if encoder.dtype != torch.float32 or encoder.device.type != "cpu":
        from vitport.device import resolve_device

        encoder = encoder.to(resolve_device("cpu"), torch.float32)
    example = torch.zeros(1, 3, *encoder.image_size)
    graph = RawGraph(encoder).eval()
    with torch.no_grad():
        names = [f"out{i}" for i in range(len(graph(example)))]
    register_symbolics()

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
                dynamic_axes={n: {0: "batch"} for n in (INPUT, *names)},
            )

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(path, write)
    except Exception as exc:  # the exporter raises many types
        raise VitportError(
            f"torch.onnx could not export {encoder.spec} ({one_line(exc, typed=True)})"
        ) from exc
    return path
