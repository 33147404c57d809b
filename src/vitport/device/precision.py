"""Process-wide switches that let float32 math run in reduced precision: CUDA's TF32 and
reduced-precision reductions, torch's float32 matmul precision, Ascend's HF32."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ABSENT", "STRICT_SETTINGS", "Setting", "tf32_enabled"]

ABSENT = object()
"""What :attr:`Setting.get` returns where the switch does not exist in this process."""


@dataclass(frozen=True)
class Setting:
    """One process-wide switch: how to read it, how to set it, and its strict value."""

    name: str
    get: Callable[[], Any]  # returns ABSENT where the switch does not exist
    put: Callable[[Any], None]
    strict: Any


def _attr(path: str, attr: str, strict: Any) -> Setting:
    """A switch that is an attribute of an object reached from ``torch`` by `path`."""

    def owner() -> Any:
        obj: Any = torch
        for part in path.split(".")[1:]:
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj

    def get() -> Any:
        obj = owner()
        return ABSENT if obj is None else getattr(obj, attr, ABSENT)

    return Setting(f"{path}.{attr}", get, lambda v: setattr(owner(), attr, v), strict)


STRICT_SETTINGS: tuple[Setting, ...] = (
    _attr("torch.backends.cuda.matmul", "allow_tf32", False),
    _attr("torch.backends.cudnn", "allow_tf32", False),
    _attr("torch.backends.cuda.matmul", "allow_fp16_reduced_precision_reduction", False),
    _attr("torch.backends.cuda.matmul", "allow_bf16_reduced_precision_reduction", False),
    Setting(
        "torch.float32_matmul_precision",
        torch.get_float32_matmul_precision,
        torch.set_float32_matmul_precision,
        "highest",
    ),
    _attr("torch.npu.matmul", "allow_hf32", False),  # Ascend's HF32 is its TF32
    _attr("torch.npu.conv", "allow_hf32", False),
)
"""Switches that let float32 math run in reduced precision, in the order they are set."""


def tf32_enabled() -> bool:
    """Whether CUDA fp32 matmuls may use TF32; reads the new API first, then the legacy ones."""
    matmul = torch.backends.cuda.matmul
    with contextlib.suppress(Exception):  # torch raises when the two APIs were mixed
        precision = getattr(matmul, "fp32_precision", None)
        if precision not in (None, "none"):
            return precision == "tf32"
    with contextlib.suppress(Exception):
        return bool(matmul.allow_tf32)
    with contextlib.suppress(Exception):
        return torch.get_float32_matmul_precision() != "highest"
    return False
