"""Devices and dtypes: every backend-specific call of vitport lives in this package.

One :class:`Device` value stands for one accelerator (or the CPU) and answers, in a
backend-neutral way, the questions the rest of vitport asks (see :mod:`vitport.device.core`).
Ascend NPUs are reached through ``torch_npu``, which registers the ``npu`` device type and the
``torch.npu`` module when imported; CUDA (and ROCm), XPU and MPS through torch itself.

- :mod:`~vitport.device.dtypes`: dtype names and parsing
- :mod:`~vitport.device.npu`: importing and diagnosing torch_npu, and its own kernels
- :mod:`~vitport.device.timer`: the region timer
- :mod:`~vitport.device.environment`: driver, CANN and package versions
- :mod:`~vitport.device.core`: the :class:`Device`
- :mod:`~vitport.device.resolve`: which devices exist, and the Device a string names
- :mod:`~vitport.device.precision`: the process-wide TF32/HF32 switches
- :mod:`~vitport.device.cuda_shim`: ``torch.cuda`` calls forwarded to the NPU
"""

from vitport.device.core import Device, out_of_memory_error
from vitport.device.cuda_shim import disable_cuda_shim, enable_cuda_shim
from vitport.device.dtypes import DTYPES, dtype_key, dtype_name, parse_dtype
from vitport.device.environment import backend_packages
from vitport.device.npu import npu_gelu, npu_problem, settle_torch_npu
from vitport.device.resolve import DEVICE_TYPES, available_devices, resolve_device
from vitport.device.timer import RegionTimer

__all__ = [
    "DEVICE_TYPES",
    "DTYPES",
    "Device",
    "RegionTimer",
    "available_devices",
    "backend_packages",
    "disable_cuda_shim",
    "dtype_key",
    "dtype_name",
    "enable_cuda_shim",
    "npu_gelu",
    "npu_problem",
    "out_of_memory_error",
    "parse_dtype",
    "resolve_device",
    "settle_torch_npu",
]

settle_torch_npu()  # once, before anything here runs a model (see vitport's docstring)
