"""Runtimes: the same Encoder run by torch, torch.compile, onnxruntime, OpenVINO, TensorRT or
torchair. Each is one adapter that declares where it applies and builds a forward function
from the Encoder (through the ONNX export where it needs one); the result is an Encoder again,
so that infer, bench, compare, embed and serve run and time it like any other. Nothing outside
an adapter knows its runtime's API.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vitport.cache import cache_root
from vitport.device import dtype_name, parse_dtype
from vitport.encoder import Encoder, RawOutput
from vitport.errors import VitportError, one_line

Build = Callable[[Encoder, Path], Callable]  # (encoder at the run's dtype, cache dir) -> forward_fn


@dataclass(frozen=True)
class Runtime:
    """One way to run an Encoder, and where it applies."""

    name: str
    devices: tuple[str, ...]  # device types it runs on
    dtypes: tuple[str, ...]
    packages: tuple[str, ...]  # what must be importable
    install: str  # the pip install that adds it
    build: Build
    torch_module: bool  # built from the torch module in the run's dtype; else exported from fp32

    def missing(self) -> str | None:
        """Why it is not installed, with the cure; None when it is."""
        absent = [p for p in self.packages if importlib.util.find_spec(p) is None]
        if absent:
            return f"{self.name} needs {', '.join(absent)}: {self.install}"
        return None

    def not_applicable(self, device_type: str, dtype: str) -> str | None:
        """Why it does not apply to this device and dtype; None when it does."""
        if device_type not in self.devices:
            return f"{self.name} runs on {', '.join(self.devices)}, not {device_type}"
        if dtype not in self.dtypes:
            return f"{self.name} runs {', '.join(self.dtypes)}, not {dtype}"
        return None


def _torch(encoder: Encoder, cache: Path) -> Callable:
    return encoder.forward_fn


def _compile(encoder: Encoder, cache: Path) -> Callable:
    from vitport.bench.configure import compile_encoder

    compile_encoder(encoder)
    return encoder.forward_fn


def onnx_file(encoder: Encoder, cache: Path) -> Path:
    """The encoder exported to ONNX (its fp32 module, dynamic batch), cached by weights, fixes
    and size: one build serves every batch size."""
    from vitport.runtimes.onnx import export_graph

    h, w = encoder.image_size
    key = f"{encoder.weights_sha256[:16]}-{h}x{w}-{'+'.join(encoder.fixes) or 'plain'}"
    path = cache / "onnx" / key / "model.onnx"
    if not path.is_file():
        export_graph(encoder, path)
    return path


def _outputs(encoder: Encoder, values: Sequence) -> RawOutput:
    tensors = [torch.from_numpy(v) if not isinstance(v, torch.Tensor) else v for v in values]
    names = ["tokens", "pooled", "logits"][: len(tensors)]
    return RawOutput(**dict(zip(names, tensors, strict=True)))


def _onnxruntime(encoder: Encoder, cache: Path) -> Callable:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # all graph optimisations are exact rewrites in fp32; none lowers precision on the CPU
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(
        str(onnx_file(encoder, cache)), options, providers=["CPUExecutionProvider"]
    )

    def forward(_module, pixels: torch.Tensor) -> RawOutput:
        feed = {session.get_inputs()[0].name: pixels.detach().float().cpu().numpy()}
        return _outputs(encoder, session.run(None, feed))

    return forward


OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def _openvino(encoder: Encoder, cache: Path) -> Callable:
    # asked for the run's dtype, never left to OpenVINO's default (bf16 on CPUs with AMX)
    return openvino_forward(encoder, cache, OPENVINO_PRECISION[dtype_name(encoder.dtype)])


def openvino_forward(encoder: Encoder, cache: Path, precision: str) -> Callable:
    """OpenVINO on the CPU at INFERENCE_PRECISION_HINT `precision` (f32, bf16, f16)."""
    import openvino as ov

    core = ov.Core()
    # no CACHE_DIR: with it, OpenVINO 2026.4 returned NaN for a bf16 compile after an f32 one
    # of the same model (seen here); compiling the cached ONNX takes about 2 s on the demo
    model = core.read_model(str(onnx_file(encoder, cache)))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()

    def forward(_module, pixels: torch.Tensor) -> RawOutput:
        result = request.infer({0: pixels.detach().float().cpu().numpy()})
        return _outputs(encoder, [result[out].copy() for out in compiled.outputs])

    return forward


def _tensorrt(encoder: Encoder, cache: Path) -> Callable:
    import torch_tensorrt

    from vitport.runtimes.onnx import RawGraph

    h, w = encoder.image_size
    shape = torch_tensorrt.Input(
        min_shape=(1, 3, h, w), opt_shape=(8, 3, h, w), max_shape=(64, 3, h, w), dtype=encoder.dtype
    )
    # the graph in the run's dtype, and TensorRT allowed that precision only
    options = {
        "enabled_precisions": {encoder.dtype},
        "cache_built_engines": True,
        "reuse_cached_engines": True,
        "engine_cache_dir": str(cache / "tensorrt"),
    }
    engine = torch_tensorrt.compile(
        RawGraph(encoder).eval(), ir="dynamo", inputs=[shape], **options
    )
    return lambda _module, pixels: _outputs(encoder, engine(pixels.to(encoder.dtype)))


def _torchair(encoder: Encoder, cache: Path) -> Callable:
    import torchair  # ships in torch-npu, which the NPU device has imported already

    backend = torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
    encoder.module.compile(backend=backend, dynamic=False)
    return encoder.forward_fn


RUNTIMES = {
    r.name: r
    for r in (
        Runtime(
            "torch",
            ("cpu", "cuda", "npu", "mps", "xpu"),
            ("fp32", "bf16", "fp16"),
            (),
            "",
            _torch,
            True,
        ),
        Runtime(
            "compile",
            ("cpu", "cuda", "npu", "xpu"),
            ("fp32", "bf16", "fp16"),
            (),
            "",
            _compile,
            True,
        ),
        Runtime(
            "onnxruntime",
            ("cpu",),
            ("fp32",),
            ("onnxruntime",),
            "pip install onnx onnxruntime",
            _onnxruntime,
            False,
        ),
        Runtime(
            "openvino",
            ("cpu",),
            ("fp32", "bf16"),
            ("openvino",),
            "pip install 'vitport[openvino]'",
            _openvino,
            False,
        ),
        Runtime(
            "tensorrt",
            ("cuda",),
            ("fp32", "fp16", "bf16"),
            ("torch_tensorrt",),
            "pip install 'vitport[tensorrt]'",
            _tensorrt,
            True,
        ),
        Runtime(
            "torchair",
            ("npu",),
            ("fp32", "fp16", "bf16"),
            (),
            "install torch-npu with CANN (torchair ships in it)",
            _torchair,
            True,
        ),
    )
}


def get_runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise VitportError(
            f"runtime={name} is unknown; choose one of {', '.join(RUNTIMES)}",
            params=("runtime=",),
        )
    return RUNTIMES[name]


def parse_runtimes(text: str | None) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    for name in names:
        get_runtime(name)
    return names


def cache_dir() -> Path:
    return cache_root() / "runtimes"


@dataclass(frozen=True)
class Built:
    encoder: Encoder
    build_seconds: float


def build(
    encoder: Encoder, name: str, dtype: torch.dtype | None = None, cache: Path | None = None
) -> Built:
    """`encoder` run by runtime `name` in `dtype` (default: the encoder's): an Encoder again,
    its forward the runtime's. A torch runtime takes the encoder already in that dtype; another
    takes it in fp32, exports it, and runs the graph at that precision (the Encoder keeps the
    fp32 module it was built from). Refused in one line where the runtime is missing or does
    not apply."""
    runtime = get_runtime(name)
    dtype = dtype or encoder.dtype
    reason = runtime.missing() or runtime.not_applicable(encoder.device.type, dtype_name(dtype))
    if reason:
        raise VitportError(reason)
    notes = list(encoder.notes)
    if runtime.torch_module and dtype != encoder.dtype:
        encoder = encoder.to(encoder.device, dtype)
    elif not runtime.torch_module:
        if next(encoder.module.parameters()).dtype != torch.float32:
            notes.append(f"{name} was built from weights already rounded to a lower dtype")
            encoder = encoder.to(encoder.device, torch.float32)
        encoder = replace(encoder, dtype=dtype)
    began = time.perf_counter()
    try:
        forward = runtime.build(encoder, cache or cache_dir())
    except VitportError:
        raise
    except Exception as exc:  # an unsupported operator, a missing library, out of memory
        raise VitportError(
            f"{name} could not build {encoder.spec}: {one_line(exc, typed=True)}"
        ) from exc
    seconds = time.perf_counter() - began
    if name != "torch":
        notes.append(f"runtime: {name} (built in {seconds:.1f} s)")
    return Built(replace(encoder, forward_fn=forward, runtime=name, notes=notes), seconds)


def on_runtime(encoder: Encoder, name: str | None) -> Encoder:
    """`encoder` run by runtime `name` (torch, as it is, when None)."""
    if not name or name == "torch":
        return encoder
    return build(encoder, name).encoder


def available(
    device_type: str, dtypes: Sequence[str], names: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """The runtimes a search tries (installed, and applying to the device in one of `dtypes`),
    and one line for each one skipped, saying why."""
    chosen, skipped = [], []
    wanted = [dtype_name(parse_dtype(d)) for d in dtypes]
    for name in names or list(RUNTIMES):
        runtime = get_runtime(name)
        reasons = [runtime.not_applicable(device_type, d) for d in wanted]
        reason = runtime.missing() or (reasons[0] if all(reasons) else None)
        if reason:
            skipped.append(reason)
        else:
            chosen.append(name)
    return chosen, skipped


def load_on(
    spec: str,
    device: str,
    dtype: str,
    runtime: str = "torch",
    fixes: Sequence[str] = (),
    **load_options,
) -> tuple[Encoder, list]:
    """Load `spec`, apply `fixes`, and build it for `runtime` (another runtime than torch is
    built from the fp32 model, at `dtype`): the one way every command gets the model it runs.
    Returns the encoder and the fixes' reports."""
    import vitport
    from vitport.fixes import apply_fixes

    kind = get_runtime(runtime)
    reason = kind.missing()
    if reason:
        raise VitportError(reason)
    encoder = vitport.load(spec, device, dtype if kind.torch_module else "fp32", **load_options)
    reports = apply_fixes(encoder, list(fixes))
    if runtime != "torch":
        encoder = build(encoder, runtime, parse_dtype(dtype)).encoder
    return encoder, reports
