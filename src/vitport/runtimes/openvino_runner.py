"""openvino: the fp32 ONNX export compiled for the CPU at the setup's precision."""

from __future__ import annotations

from pathlib import Path

import torch

from vitport.encoder import Encoder, RawOutput
from vitport.runtimes.base import RUNNERS, Forward, Limits, Runner, Setup
from vitport.runtimes.onnx import onnx_file, raw_output

PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}  # INFERENCE_PRECISION_HINT values
DTYPE_OF = {hint: dtype for dtype, hint in PRECISION.items()}


def ran_precision(compiled) -> str:
    """The precision a compiled OpenVINO model runs at (f32, bf16, f16), read from the compiled
    model, not from what was asked: the CPU plugin runs a bf16 hint in f32 on a CPU without
    bf16, and an f16 hint in bf16 on one without f16. The runtime model's per-op precisions
    confirm it: a lowered hint that no op runs at is f32."""
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    precision = getattr(hint, "get_type_name", lambda: str(hint))()
    if precision == "f32":
        return precision
    ops = compiled.get_runtime_model().get_ops()
    ran = {
        str(op.get_rt_info()["runtimePrecision"].astype(str))
        for op in ops
        if "runtimePrecision" in op.get_rt_info()
    }
    return precision if not ran or precision in ran else "f32"


class OpenVinoRunner(Runner):
    name = "openvino"
    limits = Limits(("cpu",), ("fp32", "bf16"))
    exported = True
    packages = ("openvino",)
    install = "pip install 'vitport[openvino]'"

    def __init__(self) -> None:
        self.request = None
        self.precision = ""  # what the compiled model runs at (see ran_precision)

    def build(self, encoder: Encoder, setup: Setup, cache: Path) -> Forward:
        # asked for the run's dtype, never left to OpenVINO's default (bf16 on CPUs with AMX)
        return self.forward_at(encoder, cache, PRECISION[setup.dtype])

    def forward_at(self, encoder: Encoder, cache: Path, precision: str) -> Forward:
        """OpenVINO on the CPU at INFERENCE_PRECISION_HINT `precision` (f32, bf16, f16)."""
        import openvino as ov

        core = ov.Core()
        # no CACHE_DIR: with it, OpenVINO 2026.4 returned NaN for a bf16 compile after an f32
        # one of the same model (seen here); compiling the cached ONNX takes about 2 s on the demo
        model = core.read_model(str(onnx_file(encoder, cache)))
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
        self.precision = ran_precision(compiled)
        self.request = compiled.create_infer_request()

        def forward(_module, pixels: torch.Tensor) -> RawOutput:
            result = self.request.infer({0: pixels.detach().float().cpu().numpy()})
            return raw_output([result[out].copy() for out in compiled.outputs])

        return forward

    def ran_dtype(self) -> str | None:
        return DTYPE_OF.get(self.precision)

    def release(self) -> None:
        self.request = None


RUNNERS.register(OpenVinoRunner.name, OpenVinoRunner)
