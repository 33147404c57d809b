"""attention-fp32: every attention module in the blocks runs in float32 (scores, softmax and
projections), inputs and weights upcast and the output cast back."""

from __future__ import annotations

from torch import nn

from vitport.device.dtypes import dtype_name
from vitport.encoder import Encoder
from vitport.fixes.base import (
    LOW_PRECISION,
    Fix,
    FixReport,
    RunInFP32,
    nothing,
    replace_modules,
    targets,
)
from vitport.format import count


class FP32Attention(RunInFP32):
    """An attention module run in float32 (scores, softmax and projections)."""


def _is_attention(module: nn.Module) -> bool:
    return (
        isinstance(module, (nn.MultiheadAttention, FP32Attention))
        or "attention" in type(module).__name__.lower()
    )


def attention_fp32(encoder: Encoder) -> FixReport:
    found = targets(encoder, _is_attention)
    if not found:
        raise nothing("attention-fp32", "no attention module found in the blocks")
    wide = encoder.dtype not in LOW_PRECISION  # the wrapper would run them unchanged

    def done(module: nn.Module) -> bool:
        return wide or isinstance(module, FP32Attention)

    return replace_modules(
        encoder,
        "attention-fp32",
        found,
        done,
        FP32Attention,
        already=f"already float32 (the model runs in {dtype_name(encoder.dtype)})",
        did=lambda n, old, _: (
            f"wrapped {count(n, 'attention module')} ({old}) "
            "to run in float32 (inputs and weights upcast, output cast back)"
        ),
    )


FIX = Fix(
    "attention-fp32",
    "run every attention module in float32 (scores, softmax, projections)",
    attention_fp32,
)
