"""The CUDA shim: code written for ``torch.cuda`` runs on the NPU."""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import torch

from vitport.device.core import device_module
from vitport.device.npu import TORCH_NPU_MISSING, import_torch_npu
from vitport.errors import DeviceError

__all__ = ["disable_cuda_shim", "enable_cuda_shim"]

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
    torch_npu, why = import_torch_npu()
    if torch_npu is None:
        raise DeviceError(why or TORCH_NPU_MISSING)
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
    npu = device_module("npu")
    if npu is None:
        raise DeviceError(TORCH_NPU_MISSING)
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
