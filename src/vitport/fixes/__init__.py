"""Numerical fixes for a port: small module swaps and settings that make a backend exact.

Each fix is one module of this package that defines its `FIX` record; the registry below lists
the modules, in the order ``all`` applies them. Adding a fix is one module and one line there.
Its record carries its standalone ``template``: the same fix as plain torch code, which a
packaged port's ``inference.py`` writes out (``tests/test_standalone.py`` checks that it computes
what the fix does, on every family's tiny model).

Each fix finds its targets from the model's structure (module types, never attribute
names), changes them in place, and reports what it changed. A fix that finds nothing to
change raises :class:`VitportError`, so a fix that does not apply never passes silently.

Fixes mutate ``encoder.module`` (and ``encoder.final_norm``/``encoder.forward_fn``) in
place; callers that need the original keep a copy first (``encoder.to(copy=True)``).
``no-tf32`` changes process-wide torch settings, not the encoder.

Device-specific kernels and switches (the NPU's GELU, HF32) come from :mod:`vitport.device`.
"""

from __future__ import annotations

from collections.abc import Sequence

from vitport.encoder import Encoder
from vitport.fixes import attention_fp32, erf_gelu, layernorm_fp32, math_sdpa, no_tf32
from vitport.fixes.attention_fp32 import FP32Attention
from vitport.fixes.base import LOW_PRECISION, Fix, FixReport, RunInFP32
from vitport.fixes.erf_gelu import ExactGELU
from vitport.fixes.layernorm_fp32 import FP32_NORMS, FP32LayerNorm, FP32Norm, FP32RMSNorm
from vitport.fixes.math_sdpa import SDPAForward
from vitport.fixes.no_tf32 import process_settings_restored
from vitport.registry import Registry

__all__ = [
    "FIXES",
    "FP32_NORMS",
    "LOW_PRECISION",
    "ExactGELU",
    "FP32Attention",
    "FP32LayerNorm",
    "FP32Norm",
    "FP32RMSNorm",
    "Fix",
    "FixReport",
    "RunInFP32",
    "SDPAForward",
    "apply_fixes",
    "fix_names",
    "parse_fixes",
    "process_settings_restored",
]

FIXES: Registry[Fix] = Registry("fix", param="fixes")
"""Every fix, in the order ``all`` applies them."""

for _module in (erf_gelu, layernorm_fp32, attention_fp32, math_sdpa, no_tf32):
    FIXES.register(_module.FIX.name, _module.FIX)


def fix_names() -> list[str]:
    """Names of every fix, in registry order."""
    return FIXES.names()


def parse_fixes(text: str | Sequence[str] | None) -> list[str]:
    """``"erf-gelu,layernorm-fp32"`` (or a list of such) -> fix names; ``"all"`` -> every fix;
    ``"none"`` alone -> no fix (to give no fixes over a port's own).

    Order is kept, duplicates dropped, underscores read as hyphens. An unknown name raises
    :class:`~vitport.registry.UnknownNameError`.
    """
    if text is None:
        return []
    items = [text] if isinstance(text, str) else list(text)
    parts = [part for item in items for part in str(item).split(",") if part.strip()]
    if [part.strip().lower() for part in parts] == ["none"]:
        return []
    return FIXES.parse(parts, allow_all=True)


def apply_fixes(encoder: Encoder, names: Sequence[str]) -> list[FixReport]:
    """Apply the named fixes in order, mutating `encoder` in place; one report per fix.

    Raises :class:`VitportError` for an unknown name or a fix that finds no target.
    """
    fixes = [FIXES.get(name) for name in names]
    reports = [fix.apply(encoder) for fix in fixes]
    encoder.fixes.extend(fix.name for fix in fixes if fix.name not in encoder.fixes)
    return reports
