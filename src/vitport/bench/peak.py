"""The roofline ceiling: vendor-published dense matmul peaks and a measured matmul peak."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vitport.bench.timing import TaskSpec, measure
from vitport.device import Device, dtype_key, dtype_name, parse_dtype
from vitport.device.precision import tf32_enabled
from vitport.runtimes.base import Setup

__all__ = [
    "VENDOR_PEAKS",
    "PeakResult",
    "clear_peak_cache",
    "emulated",
    "emulation_note",
    "measure_peak",
    "measure_peaks",
    "peak_dtype_key",
    "vendor_peak",
]

# Dense (no structured sparsity) peak TFLOP/s from vendor datasheets/whitepapers, keyed by a
# substring of the device name as the backend reports it (matched case-insensitively, "-" and
# "_" read as spaces, the longest matching key wins). "fp32" is the plain CUDA-core rate;
# "tf32" the tensor-core rate used for fp32 matmuls when TF32 is allowed (see
# peak_dtype_key). Datasheets quote tensor-core rates "with sparsity": halved here.
# A dtype absent from an entry means "no figure we are sure of"; an empty entry names a
# variant that must not fall through to a shorter key.
VENDOR_PEAKS: dict[str, dict[str, float]] = {
    # NVIDIA H100 Tensor Core GPU Architecture whitepaper (SXM5 column); torch reports
    # "NVIDIA H100 80GB HBM3".
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    # Same whitepaper, H100 PCIe column.
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    # H100 NVL product brief (1,671 / 835 TFLOPS with sparsity; FP32 60).
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    # H200 datasheet: same compute as H100 SXM (1,979 bf16 with sparsity; FP32 67).
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    # H200 NVL datasheet: same compute as H100 NVL.
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    # GH200 datasheet: the Hopper GPU at H100 SXM rates (and keeps "GH200" off "H200").
    "GH200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    # NVIDIA A100 datasheet (SXM and PCIe, 40 and 80 GB alike).
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    # NVIDIA L40S datasheet (362.05 dense, 733 with sparsity).
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    # NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: tensor rates with FP32
    # accumulation (what torch uses), dense.
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    # Cut-down variants with other clocks/SM counts: no figure rather than the wrong one.
    "RTX 4090 D": {},
    "RTX 4090 Laptop": {},
    # Ascend 910B (the NPU reports e.g. "Ascend910B2"): Huawei publishes no per-variant dense
    # fp16/bf16 figure we could confirm (circulating numbers, ~280-400 TFLOPS, are third-party),
    # so none is given; measure_peak gives the measured ceiling instead.
}


def _normalise(name: str) -> str:
    return " ".join(name.lower().replace("-", " ").replace("_", " ").split())


def vendor_peak(device_name: str, dtype: str | torch.dtype) -> float | None:
    """The vendor's dense peak TFLOP/s for ``dtype`` ("bf16", "fp16", "fp32", "tf32" or a
    torch dtype) on the device named ``device_name``; None when unknown."""
    name = _normalise(device_name)
    matches = [key for key in VENDOR_PEAKS if _normalise(key) in name]
    if not matches:
        return None
    best = max(matches, key=len)
    key = dtype_key(dtype)
    return VENDOR_PEAKS[best].get(key) if key else None


def peak_dtype_key(dtype: torch.dtype) -> str:
    """The :data:`VENDOR_PEAKS` key that bounds matmuls in ``dtype`` with the current settings.

    fp32 matmuls run on TF32 tensor cores when torch's CUDA matmul settings allow it
    (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, ``allow_tf32`` or
    ``torch.set_float32_matmul_precision("high")``): the ceiling is then "tf32".
    """
    name = dtype_name(dtype)
    if name != "fp32":
        return name
    return "tf32" if tf32_enabled() else "fp32"


@dataclass(frozen=True)
class PeakResult:
    """A measured square-matmul rate: ``tflops`` = 2·size³ / median ``seconds`` / 1e12."""

    dtype: str
    size: int
    tflops: float
    seconds: float
    iterations: int


_CACHE: dict[tuple[str, str, int, float], PeakResult] = {}


def clear_peak_cache() -> None:
    """Forget measured peaks (they are cached per device, dtype, size and min_seconds)."""
    _CACHE.clear()


def measure_peak(
    device: Device, dtype: torch.dtype, size: int | None = None, min_seconds: float = 1.0
) -> PeakResult:
    """Measure the matmul ceiling: ``size``×``size`` @ ``size``×``size`` in ``dtype``, through
    ``torch.mm`` or ``torch.nn.functional.linear`` (the kernel Linear layers use), whichever a
    small probe finds faster here: neither is the ceiling everywhere.

    ``size`` defaults to 8192 on accelerators and 2048 on the CPU. Each matmul is timed with
    ``device.timer()`` through :func:`vitport.bench.timing.measure`; the rate uses the median.
    Results are cached in-process per (device, dtype, size, min_seconds).
    """
    if size is None:
        size = 2048 if device.type == "cpu" else 8192
    if size < 1:
        raise ValueError(f"matmul size must be positive, got {size}")
    key = (str(device), dtype_name(dtype), int(size), float(min_seconds))
    if key not in _CACHE:
        _CACHE[key] = _measure(device, dtype, int(size), float(min_seconds))
    return _CACHE[key]


MATMULS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    torch.mm,
    torch.nn.functional.linear,
)


def _faster_matmul(
    device: Device, dtype: torch.dtype, size: int = 256
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """torch.mm or F.linear, whichever runs a ``size``² product faster on `device`: on a 2-core
    x86 CPU fp32 mm ran 2x linear, while bf16 linear ran 60x mm (a slow fallback kernel)."""
    a, b = (torch.randn(size, size).to(device=device.torch_device, dtype=dtype) for _ in range(2))

    def seconds(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
        op(a, b)  # kernel selection and caches, untimed
        with device.timer() as timer:
            for _ in range(3):
                op(a, b)
        return timer.seconds

    with torch.no_grad():
        return min(MATMULS, key=seconds)


def _measure(device: Device, dtype: torch.dtype, size: int, min_seconds: float) -> PeakResult:
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator) for _ in range(2))
    a = a.to(device=device.torch_device, dtype=dtype)
    b = b.to(device=device.torch_device, dtype=dtype)

    op = _faster_matmul(device, dtype)

    def matmul() -> None:
        op(a, b)

    spec = TaskSpec(
        model=f"matmul {size}x{size}",
        device=str(device),
        batch_size=1,
        image_size=(size, size),
        setup=Setup(dtype=dtype_name(dtype)),
    )
    with torch.no_grad():
        result = measure(
            matmul,
            device,
            spec,
            warmup_iters=3,
            warmup_seconds=min(0.5, min_seconds / 4),
            min_iters=5,
            min_seconds=min_seconds,
            max_seconds=max(30.0, 10 * min_seconds),
        )
    seconds = result.median
    tflops = 2.0 * size**3 / seconds / 1e12 if seconds > 0 else math.inf
    return PeakResult(
        dtype=dtype_name(dtype),
        size=size,
        tflops=tflops,
        seconds=seconds,
        iterations=len(result.times),
    )


def measure_peaks(
    device: Device, dtypes: Sequence[str], size: int | None = None, min_seconds: float = 1.0
) -> dict[str, float]:
    """The measured matmul peak (TFLOP/s) of each of `dtypes` and of fp32 on `device`, by dtype
    name: what a choice between dtypes is decided by, instead of assuming 16-bit is fast."""
    names = dict.fromkeys(["fp32", *(dtype_name(parse_dtype(d)) for d in dtypes)])
    return {
        name: measure_peak(device, parse_dtype(name), size, min_seconds).tflops for name in names
    }


def emulated(dtype: str, tflops: float, fp32_tflops: float) -> bool:
    """Whether `dtype` runs emulated here: its measured matmul peak is below fp32's (a CPU
    without bf16 units converts to fp32 and back around every product)."""
    return dtype_name(parse_dtype(dtype)) != "fp32" and tflops < fp32_tflops


def emulation_note(dtype: str, tflops: float, fp32_tflops: float) -> str | None:
    """One note saying `dtype` runs emulated here, from the two measured peaks; None when it
    does not."""
    if not emulated(dtype, tflops, fp32_tflops):
        return None
    return (
        f"{dtype} runs emulated here: its measured matmul peak ({tflops:.3g} TFLOP/s) is "
        f"{fp32_tflops / tflops:.1f}x below fp32's ({fp32_tflops:.3g} TFLOP/s), so this device "
        f"has no {dtype} units that pay; fp32 runs faster"
    )
