"""Devices and dtypes: every backend-specific call of vitport lives here.

One :class:`Device` value stands for one accelerator (or the CPU) and answers, in a
backend-neutral way, the questions the rest of vitport asks: how to synchronize, how to
time a region honestly, how much memory is in use, whether an exception means "out of
memory", which dtypes work, and what the hardware and software stack are.

Ascend NPUs are reached through ``torch_npu``, which registers the ``npu`` device type and
the ``torch.npu`` module when imported; CUDA (and ROCm), XPU and MPS through torch itself.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any

import torch

from vitport.errors import DeviceError, OutOfMemoryError

__all__ = [
    "DEVICE_TYPES",
    "DTYPES",
    "Device",
    "RegionTimer",
    "available_devices",
    "disable_cuda_shim",
    "dtype_name",
    "enable_cuda_shim",
    "out_of_memory_error",
    "parse_dtype",
    "resolve_device",
]

# --------------------------------------------------------------------------- dtypes

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp64": torch.float64,
}

_DTYPE_ALIASES: dict[str, str] = {
    "float32": "fp32",
    "float": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "float64": "fp64",
    "double": "fp64",
}

_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Turn ``"bf16"``, ``"bfloat16"``, ``"torch.bfloat16"`` or ``torch.bfloat16`` into a dtype."""
    if isinstance(name, torch.dtype):
        if name in _DTYPE_NAMES:
            return name
        key = str(name)
    else:
        key = str(name).strip().lower()
        key = key.removeprefix("torch.")
        key = _DTYPE_ALIASES.get(key, key)
        if key in DTYPES:
            return DTYPES[key]
    valid = ", ".join(DTYPES)
    aliases = ", ".join(_DTYPE_ALIASES)
    raise DeviceError(f"unknown dtype {key!r}; use one of {valid} (aliases: {aliases})")


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a dtype: ``torch.bfloat16 -> "bf16"``; other dtypes lose the ``torch.``."""
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def dtype_key(dtype: str | torch.dtype) -> str | None:
    """The short name lookup tables use: a dtype's (``"bf16"``), or ``"tf32"`` (a matmul mode,
    not a dtype); None for anything else."""
    if isinstance(dtype, str) and dtype.strip().lower() == "tf32":
        return "tf32"
    try:
        return dtype_name(parse_dtype(dtype))
    except DeviceError:
        return None


# --------------------------------------------------------------------------- backends

DEVICE_TYPES: tuple[str, ...] = ("npu", "cuda", "xpu", "mps", "cpu")
"""Known device types, in the order ``resolve_device("auto")`` tries them."""

_TORCH_NPU_MISSING = (
    "device 'npu' needs torch_npu: pip install torch-npu matching your torch and CANN "
    "(see https://gitee.com/ascend/pytorch)"
)


_HIDDEN: dict[str, str] = {}  # why torch_npu was hidden from other libraries, once it failed


def _import_torch_npu() -> tuple[ModuleType | None, str | None]:
    """Import torch_npu (which registers the npu backend); return (module, why-not).

    A torch_npu that is installed but fails to import is then hidden (``sys.modules`` entry
    None): libraries that probe for it with ``find_spec`` and import it unguarded, as
    transformers does, see no torch_npu instead of crashing."""
    if sys.modules.get("torch_npu", False) is None and "torch_npu" in _HIDDEN:
        return None, _HIDDEN["torch_npu"]
    try:
        return importlib.import_module("torch_npu"), None
    except ImportError as exc:
        if getattr(exc, "name", None) == "torch_npu":
            return None, _TORCH_NPU_MISSING
        return None, _hide_torch_npu(_torch_npu_broken(exc))
    except Exception as exc:  # a broken CANN install raises OSError, RuntimeError, ...
        return None, _hide_torch_npu(_torch_npu_broken(exc))


def _hide_torch_npu(why: str) -> str:
    for name in [n for n in sys.modules if n == "torch_npu" or n.startswith("torch_npu.")]:
        del sys.modules[name]
    sys.modules["torch_npu"] = None  # type: ignore[assignment]
    _HIDDEN["torch_npu"] = why
    return why


def settle_torch_npu() -> None:
    """Import an installed torch_npu now, as torch's autoload would, but without crashing."""
    if "torch_npu" not in sys.modules and importlib.util.find_spec("torch_npu") is not None:
        _import_torch_npu()


CANN_LIBRARIES = ("libhccl.so", "libascendcl.so", "libacl", "libge_runner.so", "libruntime.so")


def _torch_npu_broken(exc: BaseException) -> str:
    """One line for a torch_npu that is installed but does not import: what, and the cure."""
    reason = " ".join(str(exc).split("Please")[0].split())[:160] or type(exc).__name__
    mismatch = torch_npu_mismatch()
    if any(lib in str(exc) for lib in CANN_LIBRARIES):
        cure = (
            "CANN's libraries are not on the library path: run 'source set_env.sh' in your CANN "
            "installation (e.g. source /usr/local/Ascend/ascend-toolkit/set_env.sh) first"
        )
        if mismatch:
            cure += f"; also, {mismatch}"
    elif mismatch or "undefined symbol" in str(exc):
        cure = mismatch or (
            "torch_npu was built for another torch: install the torch-npu release that "
            f"matches torch {torch.__version__}"
        )
    else:
        cure = "check that CANN is installed and sourced, and that torch_npu matches your torch"
    return f"torch_npu is installed but does not import ({reason}): {cure}"


def torch_npu_mismatch() -> str | None:
    """'torch-npu X needs torch Y, this is torch Z; ...' when the installed pair disagrees."""
    try:
        from packaging.requirements import Requirement

        requires = importlib.metadata.requires("torch_npu") or []
    except (importlib.metadata.PackageNotFoundError, ImportError):
        return None
    installed = torch.__version__.split("+")[0]
    for line in requires:
        requirement = Requirement(line)
        if (
            requirement.name == "torch"
            and requirement.specifier
            and not (requirement.specifier.contains(installed, prereleases=True))
        ):
            return (
                f"torch-npu {_dist_version('torch_npu')} is built for torch{requirement.specifier} "
                f"but this is torch {installed}: pip install 'torch{requirement.specifier}' (or "
                f"the torch-npu release built for torch {installed})"
            )
    return None


def npu_problem() -> str | None:
    """Why the NPU cannot be used although torch_npu is installed; None when it imports or
    when torch_npu is not installed at all."""
    try:
        importlib.metadata.version("torch_npu")
    except importlib.metadata.PackageNotFoundError:
        if importlib.util.find_spec("torch_npu") is None:
            return None
    module, why = _import_torch_npu()
    return None if module is not None else why


def _device_module(device_type: str) -> Any:
    """The ``torch.<type>`` module of a backend, or None (always None for cpu)."""
    if device_type == "cpu":
        return None
    module = None
    get = getattr(torch, "get_device_module", None)
    if get is not None:
        try:
            module = get(device_type)
        except (RuntimeError, ValueError, AttributeError):
            module = None
    # get_device_module is cached; the live attribute wins when a backend was (re)registered.
    live = getattr(torch, device_type, None)
    if live is not None and live is not module:
        return live
    return module


def _count(device_type: str) -> int:
    """How many devices of this type are usable here (0 when the backend is absent)."""
    try:
        if device_type == "cpu":
            return 1
        if device_type == "npu":
            torch_npu, _ = _import_torch_npu()
            if torch_npu is None:
                return 0
        if device_type == "mps":
            backend = getattr(torch.backends, "mps", None)
            if backend is None or not backend.is_available():
                return 0
            return 1
        module = _device_module(device_type)
        if module is None or not module.is_available():
            return 0
        return int(module.device_count())
    except Exception:  # a backend that cannot even answer is not available
        return 0


def available_devices() -> list[str]:
    """Device types usable on this machine, best first, ``"cpu"`` last (e.g. ``["cpu"]``)."""
    return [t for t in DEVICE_TYPES if _count(t) > 0]


# --------------------------------------------------------------------------- timing


class RegionTimer:
    """Context manager timing one region of device work; read ``seconds`` after the block.

    On an asynchronous device the region is bounded by device events (``torch.Event`` or the
    backend's ``Event`` with ``enable_timing``) and synchronized at exit; where the backend
    has no timing events the device is synchronized at both edges around
    ``time.perf_counter()``. ``method`` says which was used.
    """

    def __init__(self, device: Device) -> None:
        self.device = device
        self.method: str = ""
        self._seconds: float | None = None
        self._start: Any = None
        self._end: Any = None
        self._t0 = 0.0

    @property
    def seconds(self) -> float:
        """Seconds the region took; only valid after the ``with`` block ended normally."""
        if self._seconds is None:
            raise RuntimeError("RegionTimer.seconds read before the timed region finished")
        return self._seconds

    def __enter__(self) -> RegionTimer:
        self._seconds = None
        self._start = self._end = None
        # Work queued before the region must not be charged to it.
        self.device.synchronize()
        if self.device.is_async:
            start, end = self.device._new_event(), self.device._new_event()
            if start is not None and end is not None:
                try:
                    start.record()
                    self._start, self._end = start, end
                    self.method = "events"
                except Exception:
                    self._start = self._end = None
        if self._start is None:
            self.method = "synchronize"
            self._t0 = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            return  # the region failed: no time, and no sync that could hide the error
        if self._start is not None:
            self._end.record()
            self._end.synchronize()
            self.device.synchronize()
            self._seconds = float(self._start.elapsed_time(self._end)) / 1000.0
        else:
            self.device.synchronize()
            self._seconds = time.perf_counter() - self._t0


# --------------------------------------------------------------------------- Device

_GIB = 1024**3


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
                raise DeviceError(_TORCH_NPU_MISSING) from exc
            raise DeviceError(f"torch does not know device type {self.type!r}") from exc

    def __str__(self) -> str:
        if self.index is None or self.type == "cpu":
            return self.type
        return f"{self.type}:{self.index}"

    @property
    def module(self) -> Any:
        """The backend module (``torch.cuda``, ``torch.npu``, ...); None for cpu."""
        return _device_module(self.type)

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

    # ---------------------------------------------------------------- helpers

    def _fn(self, name: str) -> Callable[..., Any] | None:
        module = self.module
        return getattr(module, name, None) if module is not None else None

    def _accelerator_fn(self, name: str) -> Callable[..., Any] | None:
        """``torch.accelerator.<name>`` when this device's type is the current accelerator."""
        acc = getattr(torch, "accelerator", None)
        if acc is None or not hasattr(acc, name):
            return None
        try:
            current = acc.current_accelerator()
        except Exception:
            return None
        if current is None or current.type != self.type:
            return None
        return getattr(acc, name)

    def _call_indexed(self, fn: Callable[..., Any]) -> Any:
        if self.index is None:
            return fn()
        try:
            return fn(self.index)
        except TypeError:  # e.g. torch.mps functions take no device argument
            return fn()

    def _new_event(self) -> Any:
        """A timing event for this device, or None where the backend has none."""
        if hasattr(torch, "Event"):
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
        fn = self._fn("synchronize") or self._accelerator_fn("synchronize")
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
            fn = self._fn(name) or self._accelerator_fn(name)
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
            fn = self._fn(name) or self._accelerator_fn(name)
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
        fn = self._fn("empty_cache") or self._accelerator_fn("empty_cache")
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
        if dtype in _DTYPE_NAMES:
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
            put("name", _cpu_name)
            put("cpu_cores", os.cpu_count)
            put("torch_threads", torch.get_num_threads)
        elif self.type == "mps":
            put("name", lambda: f"{_cpu_name()} GPU (MPS)")
            put("macos", lambda: platform.mac_ver()[0])
            put(
                "recommended_max_memory",
                lambda: _gib(self.module.recommended_max_memory()),
                optional=True,
            )
        else:
            put("name", lambda: self.module.get_device_name(index))
            put("total_memory", lambda: _gib(self._total_memory(index)))
        if self.type == "cuda":
            put("compute_capability", lambda: _capability(self.module.get_device_capability(index)))
            put("cuda_runtime", lambda: torch.version.cuda)
            put("hip_runtime", lambda: torch.version.hip, optional=True)
            put("cudnn", torch.backends.cudnn.version)
            put("driver_version", _nvidia_driver_version)
        elif self.type == "xpu":
            put(
                "driver_version",
                lambda: self.module.get_device_properties(index).driver_version,
            )
        elif self.type == "npu":
            put("cann", _cann_version)
            put("driver_version", _ascend_driver_version)
            put("soc_version", lambda: self.module.get_soc_version(), optional=True)
        put("python", platform.python_version)
        put("torch", lambda: torch.__version__)
        put("torch_npu", _torch_npu_version)
        put("transformers", lambda: _dist_version("transformers"))
        put("timm", lambda: _dist_version("timm"))
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


# --------------------------------------------------------------------------- describe helpers


def _capability(cap: tuple[int, int]) -> str:
    return f"{cap[0]}.{cap[1]}"


def _gib(n: int | None) -> str | None:
    return None if n is None else f"{n / _GIB:.1f} GiB"


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _torch_npu_version() -> str:
    module = sys.modules.get("torch_npu")
    version = getattr(module, "__version__", None) if module is not None else None
    if version:
        return str(version)
    return _dist_version("torch-npu")


def _read_first(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def _cpu_name() -> str:
    text = _read_first("/proc/cpuinfo")
    if text:
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    if sys.platform == "darwin":
        try:
            brand = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            brand = ""
        if brand:
            return brand
    return platform.processor() or platform.machine()


def _nvidia_driver_version() -> str | None:
    text = _read_first("/proc/driver/nvidia/version")
    if text:
        match = re.search(r"Kernel Module(?: for \S+)?\s+(\d[\d.]+)", text)
        if match:
            return match.group(1)
    return None


def _version_line(text: str) -> str | None:
    match = re.search(r"^\s*(?:version|Version)\s*=\s*(\S+)", text, re.MULTILINE)
    return match.group(1).strip("\"'") if match else None


def _cann_version() -> str | None:
    """CANN version: torch_npu's own query when it has one, else the toolkit's install info."""
    torch_npu = sys.modules.get("torch_npu")
    if torch_npu is not None:
        for owner in (getattr(torch_npu, "utils", None), getattr(torch_npu, "npu", None)):
            get = getattr(owner, "get_cann_version", None) if owner is not None else None
            if get is None:
                get = getattr(getattr(owner, "utils", None), "get_cann_version", None)
            if get is not None:
                try:
                    version = get()
                    if version:
                        return str(version)
                except Exception:
                    pass
    homes = [
        os.environ.get("ASCEND_TOOLKIT_HOME"),
        os.environ.get("ASCEND_HOME_PATH"),
        "/usr/local/Ascend/ascend-toolkit/latest",
    ]
    arch = platform.machine().lower().replace("arm64", "aarch64").replace("amd64", "x86_64")
    for home in filter(None, homes):
        for rel in (
            f"{arch}-linux/ascend_toolkit_install.info",
            f"{arch}-linux/ascend_all_cann_install.info",
            "version.cfg",
            "compiler/version.info",
            "runtime/version.info",
        ):
            text = _read_first(os.path.join(home, rel))
            version = _version_line(text) if text else None
            if version:
                return version
    return None


def _ascend_driver_version() -> str | None:
    text = _read_first("/usr/local/Ascend/driver/version.info")
    return _version_line(text) if text else None


# --------------------------------------------------------------------------- resolution

_SPEC = re.compile(r"^(?P<type>[a-z]+)(?::(?P<index>\d+))?$")
_VALID_FORMS = "auto, cpu, cuda, cuda:N, npu, npu:N, xpu, xpu:N, mps"


def _not_available(device_type: str) -> DeviceError:
    available = available_devices()
    fallback = available[0] if available else "cpu"
    return DeviceError(
        f"device {device_type!r} is not available on this machine "
        f"(available: {', '.join(available)}); use --device {fallback} or install the backend"
    )


def _current_index(device_type: str) -> int:
    module = _device_module(device_type)
    try:
        return int(module.current_device())
    except Exception:
        return 0


def resolve_device(spec: str | torch.device | Device = "auto") -> Device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda:1"``, ``"npu"``, ... into a usable :class:`Device`.

    ``auto`` picks npu (torch_npu importable and a device present), else cuda, xpu, mps, cpu.
    """
    if isinstance(spec, Device):
        spec = str(spec)
    text = str(spec).strip().lower()
    if text == "auto":
        for device_type in DEVICE_TYPES:
            if _count(device_type) > 0:
                if device_type == "cpu":
                    return Device("cpu")
                return Device(device_type, _current_index(device_type))
        return Device("cpu")

    match = _SPEC.match(text)
    if match is None or match["type"] not in DEVICE_TYPES:
        raise DeviceError(f"unknown device {str(spec)!r}; use one of: {_VALID_FORMS}")
    device_type = match["type"]
    index = int(match["index"]) if match["index"] is not None else None
    if device_type == "cpu":
        return Device("cpu")
    if device_type == "npu":
        torch_npu, why = _import_torch_npu()
        if torch_npu is None:
            raise DeviceError(why or _TORCH_NPU_MISSING)
    count = _count(device_type)
    if count == 0:
        raise _not_available(device_type)
    if index is None:
        return Device(device_type, _current_index(device_type))
    if index >= count:
        plural = "device" if count == 1 else "devices"
        raise DeviceError(
            f"device '{device_type}:{index}' does not exist: this machine has {count} "
            f"{device_type} {plural} ({device_type}:0..{device_type}:{count - 1})"
        )
    return Device(device_type, index)


# --------------------------------------------------------------------------- OOM


def out_of_memory_error(device: Device, exc: BaseException, what: str) -> OutOfMemoryError:
    """A one-line :class:`OutOfMemoryError` for ``exc`` (its cause), naming the peak if known."""
    try:
        peak = device.peak_memory()
    except Exception:
        peak = None
    where = f" (peak {peak / _GIB:.1f} GiB)" if peak else ""
    error = OutOfMemoryError(
        f"out of memory on {device} while {what}{where}; "
        "try a smaller --batch-sizes or --dtype bf16"
    )
    error.__cause__ = exc
    return error


# --------------------------------------------------------------------------- CUDA shim

_SHIM_NAMES: tuple[str, ...] = (
    "is_available",
    "is_initialized",
    "init",
    "device_count",
    "current_device",
    "set_device",
    "device",
    "device_of",
    "synchronize",
    "empty_cache",
    "memory_allocated",
    "max_memory_allocated",
    "memory_reserved",
    "max_memory_reserved",
    "reset_peak_memory_stats",
    "reset_max_memory_allocated",
    "reset_max_memory_cached",
    "memory_stats",
    "memory_summary",
    "mem_get_info",
    "set_per_process_memory_fraction",
    "Event",
    "Stream",
    "stream",
    "current_stream",
    "default_stream",
    "set_stream",
    "get_device_name",
    "get_device_properties",
    "get_device_capability",
    "is_bf16_supported",
    "manual_seed",
    "manual_seed_all",
    "seed",
    "seed_all",
    "initial_seed",
    "get_rng_state",
    "set_rng_state",
    "get_rng_state_all",
    "set_rng_state_all",
)
"""Attributes of ``torch.cuda`` forwarded to ``torch.npu`` when both have them."""

_MISSING = object()
_shim_saved: dict[str, Any] = {}
_shim_state: dict[str, str] = {}


def enable_cuda_shim() -> str:
    """Make code written for ``torch.cuda`` run on the NPU; return what was done.

    Uses ``torch_npu.contrib.transfer_to_npu`` when importable (it patches torch.cuda,
    ``.cuda()`` and ``"cuda"`` device strings, and cannot be undone). Otherwise forwards the
    ``torch.cuda`` functions that ``torch.npu`` also has; :func:`disable_cuda_shim` undoes
    that. Idempotent. Raises :class:`DeviceError` when torch_npu is missing.
    """
    if "description" in _shim_state:
        return _shim_state["description"]
    torch_npu, why = _import_torch_npu()
    if torch_npu is None:
        raise DeviceError(why or _TORCH_NPU_MISSING)
    try:
        importlib.import_module("torch_npu.contrib.transfer_to_npu")
    except ImportError:
        pass
    else:
        description = (
            "torch_npu.contrib.transfer_to_npu imported: torch.cuda calls, .cuda() and 'cuda' "
            "device strings now go to the NPU (cannot be undone in this process)"
        )
        _shim_state.update(mode="transfer_to_npu", description=description)
        return description
    npu = _device_module("npu")
    if npu is None:
        raise DeviceError(_TORCH_NPU_MISSING)
    forwarded: list[str] = []
    for name in _SHIM_NAMES:
        target = getattr(npu, name, None)
        if target is None or not hasattr(torch.cuda, name):
            continue
        _shim_saved[name] = torch.cuda.__dict__.get(name, _MISSING)
        setattr(torch.cuda, name, target)
        forwarded.append(name)
    description = (
        f"forwarded {len(forwarded)} torch.cuda attributes to torch.npu ({', '.join(forwarded)})"
    )
    _shim_state.update(mode="forward", description=description)
    return description


def disable_cuda_shim() -> bool:
    """Undo :func:`enable_cuda_shim`'s forwarding; True if anything was restored.

    A ``transfer_to_npu`` patch cannot be undone; it stays in force (returns False), but
    the next :func:`enable_cuda_shim` call decides afresh.
    """
    if _shim_state.get("mode") != "forward":
        _shim_state.clear()
        return False
    for name, original in _shim_saved.items():
        if original is _MISSING:
            with contextlib.suppress(AttributeError):
                delattr(torch.cuda, name)
        else:
            setattr(torch.cuda, name, original)
    _shim_saved.clear()
    _shim_state.clear()
    return True
