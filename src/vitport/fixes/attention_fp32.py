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


TEMPLATE = '''\
# attention-fp32: every attention module in the blocks runs in float32 (projections, scores,
# softmax): its weights kept in float32, its float16/bfloat16 inputs upcast, its outputs cast
# back to the dtype of its first input
LOW_PRECISION = (torch.float16, torch.bfloat16)


def cast_tensors(value, source, target):
    """The tensors of a `source` dtype in `value` (nested tuples, lists, dicts) as `target`."""
    if isinstance(value, torch.Tensor):
        return value.to(target) if value.dtype in source else value
    if isinstance(value, (tuple, list)):
        return type(value)(cast_tensors(v, source, target) for v in value)
    if isinstance(value, dict):
        return {k: cast_tensors(v, source, target) for k, v in value.items()}
    return value


class FP32Attention(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attention = attention.float()

    def forward(self, *args, **kwargs):
        inputs = (*args, *kwargs.values())
        floats = [t for t in inputs if torch.is_tensor(t) and t.is_floating_point()]
        dtype = floats[0].dtype if floats else None
        if dtype not in LOW_PRECISION:
            return self.attention(*args, **kwargs)
        args, kwargs = cast_tensors((args, kwargs), LOW_PRECISION, torch.float32)
        return cast_tensors(self.attention(*args, **kwargs), (torch.float32,), dtype)


def is_attention(module):
    named = "attention" in type(module).__name__.lower()
    return named or isinstance(module, nn.MultiheadAttention)


def wrap_attention(parent):
    for name, child in list(parent.named_children()):
        if is_attention(child):
            setattr(parent, name, FP32Attention(child))
        else:
            wrap_attention(child)


for block in blocks:
    wrap_attention(block)
'''

FIX = Fix(
    "attention-fp32",
    "run every attention module in float32 (scores, softmax, projections)",
    attention_fp32,
    TEMPLATE,
)
