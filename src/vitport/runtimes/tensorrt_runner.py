"""tensorrt: Torch-TensorRT (dynamo) on an NVIDIA GPU, one engine for batches 1 to MAX_BATCH."""

from __future__ import annotations

from pathlib import Path

from vitport.device import parse_dtype
from vitport.encoder import Encoder
from vitport.runtimes.base import DTYPES, RUNNERS, Forward, Limits, Runner, Setup
from vitport.runtimes.onnx import EncoderGraph, raw_output

OPT_BATCH = 8  # the batch the engine is tuned for
MAX_BATCH = 64  # the engine's profile ends here: a larger batch is refused before the build


class TensorRtRunner(Runner):
    name = "tensorrt"
    limits = Limits(("cuda",), DTYPES, min_batch=1, max_batch=MAX_BATCH)
    packages = ("torch_tensorrt",)
    install = "pip install 'vitport[tensorrt]'"

    def __init__(self) -> None:
        self.engine = None
        self.device = None

    def build(self, encoder: Encoder, setup: Setup, cache: Path) -> Forward:
        import torch_tensorrt

        dtype = parse_dtype(setup.dtype)
        self.device = encoder.device
        h, w = encoder.image_size
        shape = torch_tensorrt.Input(
            min_shape=(self.limits.min_batch, 3, h, w),
            opt_shape=(OPT_BATCH, 3, h, w),
            max_shape=(MAX_BATCH, 3, h, w),
            dtype=dtype,
        )
        # the graph in the run's dtype, and TensorRT allowed that precision only
        options = {
            "enabled_precisions": {dtype},
            "cache_built_engines": True,
            "reuse_cached_engines": True,
            "engine_cache_dir": str(cache / "tensorrt"),
        }
        self.engine = torch_tensorrt.compile(
            EncoderGraph(encoder).eval(), ir="dynamo", inputs=[shape], **options
        )
        return lambda _module, pixels: raw_output(self.engine(pixels.to(dtype)))

    def release(self) -> None:
        self.engine = None
        if self.device is not None:
            self.device.empty_cache()


RUNNERS.register(TensorRtRunner.name, TensorRtRunner)
