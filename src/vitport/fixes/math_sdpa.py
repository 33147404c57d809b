"""math-sdpa: the encoder's forward runs with the math backend of
scaled_dot_product_attention."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vitport.encoder import Encoder, RawOutput
from vitport.fixes.base import Fix, FixReport


class SDPAForward:
    """An encoder forward that runs inside ``sdpa_kernel``, limited to one SDPA backend
    (named as in ``torch.nn.attention.SDPBackend``: "MATH", "FLASH_ATTENTION", ...)."""

    def __init__(self, inner: Callable[[nn.Module, torch.Tensor], RawOutput], backend: str) -> None:
        self.inner = inner
        self.backend = backend

    def __call__(self, module: nn.Module, pixels: torch.Tensor) -> RawOutput:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, self.backend)]):
            return self.inner(module, pixels)

    def __repr__(self) -> str:
        inner = getattr(self.inner, "__qualname__", repr(self.inner))
        return f"SDPAForward({inner}, {self.backend})"


def _sdpa_unused(encoder: Encoder) -> str:
    """Why this model never calls SDPA, so its backend cannot matter ("" when it does)."""
    config = getattr(encoder.module, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in (None, "sdpa"):
        return f"the model uses {impl!r} attention"
    fused = [m.fused_attn for b in encoder.blocks for m in b.modules() if hasattr(m, "fused_attn")]
    if fused and not any(fused):
        return "the timm attention is not fused, fused_attn=False"
    return ""


def math_sdpa(encoder: Encoder) -> FixReport:
    target = ("forward_fn",)
    forward = encoder.forward_fn
    if isinstance(forward, SDPAForward) and forward.backend == "MATH":
        return FixReport(
            "math-sdpa", 0, (), "already math SDPA: nothing to change (the forward runs with it)"
        )
    unused = _sdpa_unused(encoder)
    if unused:
        return FixReport("math-sdpa", 0, (), f"SDPA not called: nothing to change ({unused})")
    encoder.forward_fn = SDPAForward(encoder.forward_fn, "MATH")
    return FixReport("math-sdpa", 1, target, "forward runs with SDPA math backend")


TEMPLATE = """\
# math-sdpa: the forward runs with the math backend of scaled_dot_product_attention
from torch.nn.attention import SDPBackend, sdpa_kernel


def with_math_sdpa(forward):
    def run(*args, **kwargs):
        with sdpa_kernel([SDPBackend.MATH]):
            return forward(*args, **kwargs)

    return run


model.forward = with_math_sdpa(model.forward)
"""

FIX = Fix(
    "math-sdpa",
    "run the forward with the math backend of scaled_dot_product_attention",
    math_sdpa,
    TEMPLATE,
)
