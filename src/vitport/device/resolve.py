"""Resolution: which devices this machine offers, and the :class:`Device` a string names."""

from __future__ import annotations

import re

import torch

from vitport.device.core import Device, accelerator_fn, device_module
from vitport.device.npu import TORCH_NPU_MISSING, import_torch_npu
from vitport.errors import DeviceError

__all__ = ["DEVICE_TYPES", "available_devices", "resolve_device"]

DEVICE_TYPES: tuple[str, ...] = ("npu", "cuda", "xpu", "mps", "cpu")
"""Known device types, in the order ``resolve_device("auto")`` tries them."""


def _count(device_type: str) -> int:
    """How many devices of this type are usable here (0 when the backend is absent)."""
    try:
        if device_type == "cpu":
            return 1
        if device_type == "npu":
            torch_npu, _ = import_torch_npu()
            if torch_npu is None:
                return 0
        if device_type == "mps":
            backend = getattr(torch.backends, "mps", None)
            if backend is None or not backend.is_available():
                return 0
            return 1
        module = device_module(device_type)
        if module is None or not module.is_available():
            return 0
        return int(module.device_count())
    except Exception:  # a backend that cannot even answer is not available
        return 0


def available_devices() -> list[str]:
    """Device types usable on this machine, best first, ``"cpu"`` last (e.g. ``["cpu"]``)."""
    return [t for t in DEVICE_TYPES if _count(t) > 0]


_SPEC = re.compile(r"^(?P<type>[a-z]+)(?::(?P<index>\d+))?$")
_VALID_FORMS = "auto, cpu, cuda, cuda:N, npu, npu:N, xpu, xpu:N, mps"


def _not_available(device_type: str, param: str) -> DeviceError:
    available = available_devices()
    fallback = available[0] if available else "cpu"
    return DeviceError(
        f"device {device_type!r} is not available on this machine "
        f"(available: {', '.join(available)}); use {param}={fallback} or install the backend",
        params=(f"{param}=",),
    )


def _current_index(device_type: str) -> int:
    """The backend's current device index: torch.accelerator's where this is the current
    accelerator, else the backend module's, else 0."""
    current = accelerator_fn(device_type, "current_device_index") or getattr(
        device_module(device_type), "current_device", None
    )
    try:
        return int(current())  # type: ignore[misc]
    except Exception:
        return 0


def resolve_device(spec: str | torch.device | Device = "auto", param: str = "device") -> Device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda:1"``, ``"npu"``, ... into a usable :class:`Device`.

    ``auto`` picks npu (torch_npu importable and a device present), else cuda, xpu, mps, cpu.
    `param` is the parameter the spec came from, which a refusal names.
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
        torch_npu, why = import_torch_npu()
        if torch_npu is None:
            raise DeviceError(why or TORCH_NPU_MISSING)
    count = _count(device_type)
    if count == 0:
        raise _not_available(device_type, param)
    if index is None:
        return Device(device_type, _current_index(device_type))
    if index >= count:
        plural = "device" if count == 1 else "devices"
        raise DeviceError(
            f"device '{device_type}:{index}' does not exist: this machine has {count} "
            f"{device_type} {plural} ({device_type}:0..{device_type}:{count - 1})"
        )
    return Device(device_type, index)
