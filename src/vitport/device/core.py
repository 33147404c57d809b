"""The Device: one accelerator (or the CPU), asked every backend-specific question vitport has.

One :class:`Device` value answers, in a backend-neutral way, how to synchronize, how to time a
region honestly, how much memory is in use, whether an exception means "out of memory", which
dtypes work, which kernels and settings the backend has of its own, and what the hardware and
software stack are. The backend's functions come from its ``torch.<type>`` module
(``torch.get_device_module``), with ``torch.accelerator`` where the module lacks one.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vitport.device import npu
from vitport.device.dtypes import DTYPE_NAMES, parse_dtype
from vitport.device.environment import (
    GIB,
    ascend_driver_version,
    cann_version,
    cpu_name,
    dist_version,
    gib,
    nvidia_driver_version,
)
from vitport.device.timer import RegionTimer
from vitport.errors import DeviceError, OutOfMemoryError

__all__ = ["Device", "accelerator_fn", "device_module", "out_of_memory_error"]

PINNED_DEVICE_TYPES = frozenset({"cuda", "npu"})
"""Device types whose host-to-device copies come from pinned memory."""

RAY_RESOURCES: dict[str, str] = {"cuda": "GPU", "npu": "NPU"}
"""The Ray resource that stands for one device of each type."""


def device_module(device_type: str) -> Any:
    """The ``torch.<type>`` module of a backend, or None (always None for cpu)."""
    if device_type == "cpu":
        return None
    try:
        module = torch.get_device_module(device_type)
    except (RuntimeError, ValueError, AttributeError):
        module = None
    # The live attribute wins when a backend was (re)registered after torch's own lookup.
    live = getattr(torch, device_type, None)
    if live is not None and live is not module:
        return live
    return module


def accelerator_fn(device_type: str, name: str) -> Callable[..., Any] | None:
    """``torch.accelerator.<name>`` when ``device_type`` is the current accelerator."""
    if not hasattr(torch.accelerator, name):
        return None
    try:
        current = torch.accelerator.current_accelerator()
    except Exception:
        return None
    if current is None or current.type != device_type:
        return None
    return getattr(torch.accelerator, name)


def _capability(cap: tuple[int, int]) -> str:
    return f"{cap[0]}.{cap[1]}"


@dataclass(frozen=True)
class Device:
    """One device: ``Device("cuda", 0)``, ``Device("npu", 1)``, ``Device("cpu")``."""

    type: str
    index: int | None = None

    @property
    def torch_device(self) -> torch.device:
        """The ``torch.device`` to move tensors and modules to."""
        try:
            if self.index is None or self.type == "cpu":
                return torch.device(self.type)
            return torch.device(self.type, self.index)
        except RuntimeError as exc:
            if self.type == "npu":
                raise DeviceError(npu.TORCH_NPU_MISSING) from exc
            raise DeviceError(f"torch does not know device type {self.type!r}") from exc

    def __str__(self) -> str:
        if self.index is None or self.type == "cpu":
            return self.type
        return f"{self.type}:{self.index}"

    @property
    def module(self) -> Any:
        """The backend module (``torch.cuda``, ``torch.npu``, ...); None for cpu."""
        return device_module(self.type)

    @property
    def flash_selectable(self) -> bool:
        """Whether torch's flash-only SDPA selection means anything here. torch_npu registers
        its own scaled_dot_product_attention and kernel choice (checked against its operator
        schemas), so on the NPU it does not."""
        return self.type != "npu"

    @property
    def is_async(self) -> bool:
        """Whether work is queued asynchronously (everything but cpu)."""
        return self.type != "cpu"

    @property
    def pin_memory(self) -> bool:
        """Whether host-to-device copies should come from pinned memory."""
        return self.type in PINNED_DEVICE_TYPES

    @property
    def ray_resource(self) -> str | None:
        """The Ray resource one device of this type counts as (``GPU``, ``NPU``); None for
        types Ray schedules as CPUs."""
        return RAY_RESOURCES.get(self.type)

    def ray_actor_options(self) -> dict[str, Any]:
        """What a Ray actor holding one device of this type asks for: Ray's own GPU count, a
        custom resource (NPU), or a CPU."""
        resource = self.ray_resource
        if resource is None:
            return {"num_cpus": 1}
        if resource == "GPU":
            return {"num_gpus": 1}
        return {"resources": {resource: 1}}

    def exact_gelu_kernel(self) -> str | None:
        """The backend's own exact (erf) GELU kernel, by name, where it has one; None where
        torch's ``F.gelu`` is the kernel. Raises :class:`VitportError` where the backend's
        kernel cannot be reached. The NPU's kernel is :func:`vitport.device.npu.npu_gelu`."""
        if self.type != "npu":
            return None
        npu.check_npu_gelu()
        return npu.NPU_GELU

    # ---------------------------------------------------------------- helpers

    def _fn(self, name: str) -> Callable[..., Any] | None:
        module = self.module
        return getattr(module, name, None) if module is not None else None

    def _call_indexed(self, fn: Callable[..., Any]) -> Any:
        if self.index is None:
            return fn()
        try:
            return fn(self.index)
        except TypeError:  # e.g. torch.mps functions take no device argument
            return fn()

    def _new_event(self) -> Any:
        """A timing event for this device, or None where the backend has none."""
        try:
            return torch.Event(device=self.torch_device, enable_timing=True)
        except Exception:
            pass
        event_cls = self._fn("Event")
        if event_cls is not None:
            try:
                return event_cls(enable_timing=True)
            except Exception:
                return None
        return None

    # ---------------------------------------------------------------- sync and timing

    def synchronize(self) -> None:
        """Wait until all work queued on this device has finished (no-op on cpu)."""
        if not self.is_async:
            return
        fn = self._fn("synchronize") or accelerator_fn(self.type, "synchronize")
        if fn is not None:
            self._call_indexed(fn)

    def timer(self) -> RegionTimer:
        """``with dev.timer() as t: work()`` then ``t.seconds``; honest on async devices."""
        return RegionTimer(self)

    # ---------------------------------------------------------------- memory

    def _memory(self, names: tuple[str, ...]) -> int | None:
        if not self.is_async:
            return None
        for name in names:
            fn = self._fn(name) or accelerator_fn(self.type, name)
            if fn is None:
                continue
            try:
                return int(self._call_indexed(fn))
            except Exception:
                return None
        return None

    def memory_allocated(self) -> int | None:
        """Bytes held by tensors now; None where the backend has no counter (cpu)."""
        return self._memory(("memory_allocated", "current_allocated_memory"))

    def peak_memory(self) -> int | None:
        """Peak bytes held by tensors since the last reset; None where not tracked."""
        return self._memory(("max_memory_allocated",))

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window."""
        if not self.is_async:
            return
        for name in ("reset_peak_memory_stats", "reset_max_memory_allocated"):
            fn = self._fn(name) or accelerator_fn(self.type, name)
            if fn is not None:
                try:
                    self._call_indexed(fn)
                except Exception:
                    continue
                return

    def empty_cache(self) -> None:
        """Give cached, unused device memory back to the driver."""
        if not self.is_async:
            return
        fn = self._fn("empty_cache") or accelerator_fn(self.type, "empty_cache")
        if fn is not None:
            fn()

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc`` means this device (or, on cpu, the host) ran out of memory."""
        oom_types = tuple(
            t
            for t in (
                getattr(torch, "OutOfMemoryError", None),
                getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None),
            )
            if isinstance(t, type)
        )
        if oom_types and isinstance(exc, oom_types):
            return True
        if isinstance(exc, MemoryError):
            return self.type == "cpu"
        if isinstance(exc, RuntimeError):
            message = str(exc).lower()
            if "out of memory" in message:  # CUDA, NPU, XPU, "MPS backend out of memory"
                return True
            if self.type == "cpu" and "can't allocate memory" in message:
                return True  # DefaultCPUAllocator
        return False

    # ---------------------------------------------------------------- dtypes

    def supports(self, dtype: torch.dtype) -> bool:
        """Whether tensors of ``dtype`` can be computed with on this device."""
        dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        if self.type == "cpu":
            return True
        if self.type == "mps" and dtype in (torch.float64, torch.complex128):
            return False
        if dtype == torch.bfloat16:
            fn = self._fn("is_bf16_supported")
            if fn is not None:
                try:
                    return bool(fn())
                except Exception:
                    pass
            if self.type == "mps":
                return self._probe(dtype)
            return True
        if dtype == torch.float64 and self.type == "xpu":
            try:
                props = self.module.get_device_properties(self.index or 0)
                return bool(getattr(props, "has_fp64", True))
            except Exception:
                return True
        if dtype in DTYPE_NAMES:
            return True
        return self._probe(dtype)

    def _probe(self, dtype: torch.dtype) -> bool:
        try:
            torch.ones(2, dtype=dtype, device=self.torch_device).sum().item()
            return True
        except Exception:
            return False

    # ---------------------------------------------------------------- description

    def describe(self) -> dict[str, str]:
        """Hardware and software facts for reports; snake_case keys, str values; never raises."""
        info: dict[str, str] = {}

        def put(key: str, get: Callable[[], Any], optional: bool = False) -> None:
            try:
                value = get()
            except Exception:
                value = None
            if value is None or value == "":
                if optional:
                    return
                value = "unknown"
            info[key] = str(value)

        index = self.index if self.index is not None else 0
        put("device", lambda: str(self))
        put("type", lambda: self.type)
        put("index", lambda: "none" if self.index is None else self.index)
        if self.type == "cpu":
            put("name", cpu_name)
            put("cpu_cores", os.cpu_count)
            put("torch_threads", torch.get_num_threads)
        elif self.type == "mps":
            put("name", lambda: f"{cpu_name()} GPU (MPS)")
            put("macos", lambda: platform.mac_ver()[0])
            put(
                "recommended_max_memory",
                lambda: gib(self.module.recommended_max_memory()),
                optional=True,
            )
        else:
            put("name", lambda: self.module.get_device_name(index))
            put("total_memory", lambda: gib(self._total_memory(index)))
        if self.type == "cuda":
            put("compute_capability", lambda: _capability(self.module.get_device_capability(index)))
            put("cuda_runtime", lambda: torch.version.cuda)
            put("hip_runtime", lambda: torch.version.hip, optional=True)
            put("cudnn", torch.backends.cudnn.version)
            put("driver_version", nvidia_driver_version)
        elif self.type == "xpu":
            put(
                "driver_version",
                lambda: self.module.get_device_properties(index).driver_version,
            )
        elif self.type == "npu":
            put("cann", cann_version)
            put("driver_version", ascend_driver_version)
            put("soc_version", lambda: self.module.get_soc_version(), optional=True)
        put("python", platform.python_version)
        put("torch", lambda: torch.__version__)
        put("torch_npu", npu.torch_npu_version)
        put("transformers", lambda: dist_version("transformers"))
        put("timm", lambda: dist_version("timm"))
        put("os", lambda: f"{platform.system()} {platform.release()}")
        put("platform", platform.platform)
        put("machine", platform.machine)
        return info

    def _total_memory(self, index: int) -> int | None:
        props = self._fn("get_device_properties")
        if props is not None:
            total = getattr(props(index), "total_memory", None)
            if total:
                return int(total)
        mem_get_info = self._fn("mem_get_info")
        if mem_get_info is not None:
            return int(mem_get_info(index)[1])
        return None


# --------------------------------------------------------------------------- OOM


def out_of_memory_error(device: Device, exc: BaseException, what: str) -> OutOfMemoryError:
    """A one-line :class:`OutOfMemoryError` for ``exc`` (its cause), naming the peak if known."""
    try:
        peak = device.peak_memory()
    except Exception:
        peak = None
    where = f" (peak {peak / GIB:.1f} GiB)" if peak else ""
    error = OutOfMemoryError(
        f"out of memory on {device} while {what}{where}; try a smaller batch_sizes or dtype='bf16'",
        params=("batch_sizes", "dtype='bf16'"),
    )
    error.__cause__ = exc
    return error
