"""The dtypes vitport computes in, and their short names (``fp32``, ``fp16``, ``bf16``, ``fp64``)."""

from __future__ import annotations

import torch

from vitport.errors import DeviceError

__all__ = ["DTYPES", "DTYPE_NAMES", "dtype_key", "dtype_name", "parse_dtype"]

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

DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
"""Short name of each dtype in :data:`DTYPES`."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Turn ``"bf16"``, ``"bfloat16"``, ``"torch.bfloat16"`` or ``torch.bfloat16`` into a dtype."""
    if isinstance(name, torch.dtype):
        if name in DTYPE_NAMES:
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
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def dtype_key(dtype: str | torch.dtype) -> str | None:
    """The short name lookup tables use: a dtype's (``"bf16"``), or ``"tf32"`` (a matmul mode,
    not a dtype); None for anything else."""
    if isinstance(dtype, str) and dtype.strip().lower() == "tf32":
        return "tf32"
    try:
        return dtype_name(parse_dtype(dtype))
    except DeviceError:
        return None
