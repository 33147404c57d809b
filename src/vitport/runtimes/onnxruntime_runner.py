"""onnxruntime: the fp32 ONNX export on the CPU execution provider."""

from __future__ import annotations

from pathlib import Path

import torch

from vitport.encoder import Encoder, RawOutput
from vitport.runtimes.base import RUNNERS, Forward, Limits, Runner, Setup
from vitport.runtimes.onnx import onnx_file, raw_output


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"
    limits = Limits(("cpu",), ("fp32",))
    exported = True
    packages = ("onnxruntime",)
    install = "pip install onnx onnxruntime"

    def __init__(self) -> None:
        self.session = None

    def build(self, encoder: Encoder, setup: Setup, cache: Path) -> Forward:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # all graph optimisations are exact rewrites in fp32; none lowers precision on the CPU
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(onnx_file(encoder, cache)), options, providers=["CPUExecutionProvider"]
        )
        name = self.session.get_inputs()[0].name

        def forward(_module, pixels: torch.Tensor) -> RawOutput:
            return raw_output(self.session.run(None, {name: pixels.detach().float().cpu().numpy()}))

        return forward

    def release(self) -> None:
        self.session = None


RUNNERS.register(OnnxRuntimeRunner.name, OnnxRuntimeRunner)
