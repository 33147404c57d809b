"""layernorm-fp32: every norm in the blocks and the final norm computes in float32 and casts
back; LayerNorm and RMSNorm by formula, any other norm with its own forward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitport.encoder import Encoder, is_norm
from vitport.fixes.base import (
    Fix,
    FixReport,
    Match,
    RunInFP32,
    nothing,
    replace_modules,
    targets,
)
from vitport.format import count


def _share(owner: nn.Module, name: str, param: Any) -> None:
    """Register `param` (the original module's Parameter, or None) under `name`."""
    if isinstance(param, nn.Parameter) or param is None:
        owner.register_parameter(name, param)
    else:  # a plain tensor attribute: keep it as a buffer
        owner.register_buffer(name, param)


class FP32LayerNorm(nn.Module):
    """LayerNorm computed in float32 with the original's parameters and eps, cast back.

    Shares the original Parameters, so the state-dict keys stay what they were.
    """

    def __init__(self, shape: Sequence[int], eps: float, weight: Any, bias: Any) -> None:
        super().__init__()
        self.normalized_shape = tuple(int(s) for s in shape)
        self.eps = float(eps)
        _share(self, "weight", weight)
        _share(self, "bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class FP32RMSNorm(nn.Module):
    """RMSNorm ``x * rsqrt(mean(x^2) + eps) * w`` in float32, cast back to the input dtype."""

    def __init__(self, shape: Sequence[int], eps: float, weight: Any) -> None:
        super().__init__()
        self.normalized_shape = tuple(int(s) for s in shape)
        self.eps = float(eps)
        _share(self, "weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        h = x.float()
        out = h * torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + self.eps)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class FP32Norm(RunInFP32):
    """A norm of a type vitport has no formula for, run in float32 with its own forward."""


FP32_NORMS = (FP32LayerNorm, FP32RMSNorm, FP32Norm)


def _is_norm(module: nn.Module) -> bool:
    """A norm, or one this fix made already (an FP32Norm holds no weight of its own)."""
    return isinstance(module, FP32_NORMS) or is_norm(module)


def _eps(module: nn.Module) -> float:
    for attr in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return torch.finfo(torch.float32).eps  # nn.RMSNorm(eps=None) uses the dtype's eps


def _shape(module: nn.Module) -> tuple[int, ...]:
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        return tuple(shape) if isinstance(shape, Sequence) else (int(shape),)
    return tuple(module.weight.shape)


def _layer_norm(module: nn.Module) -> nn.Module:
    return FP32LayerNorm(_shape(module), _eps(module), module.weight, module.bias)


def _rms_norm(module: nn.Module) -> nn.Module:
    return FP32RMSNorm(_shape(module), _eps(module), getattr(module, "weight", None))


NORM_FORMULAS: tuple[tuple[Match, Callable[[nn.Module], nn.Module]], ...] = (
    (lambda m: isinstance(m, nn.LayerNorm), _layer_norm),
    (lambda m: isinstance(m, nn.RMSNorm) or "rmsnorm" in type(m).__name__.lower(), _rms_norm),
)
"""Norm kinds vitport computes by formula; any other norm runs its own forward in fp32."""


@torch.no_grad()
def _agrees(original: nn.Module, formula: nn.Module) -> bool:
    """Whether the formula computes what the module does (within low-precision error).

    Guards against subclasses with other semantics (channels-first LayerNorm2d, Gemma's
    ``1 + weight``); a module that merely computes in low precision still agrees.
    """
    try:
        weight = next(iter(original.parameters()), None)
        where = {"device": weight.device} if weight is not None else {}
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, *formula.normalized_shape, generator=gen).to(**where)
        if weight is not None:
            x = x.to(weight.dtype)
        want, got = original(x).float(), formula(x).float()
    except Exception:
        return False
    if want.shape != got.shape:
        return False
    return bool((want - got).norm() <= 0.02 * want.norm() + 1e-6)


def _fp32_norm(module: nn.Module) -> nn.Module:
    for match, build in NORM_FORMULAS:
        if match(module):
            formula = build(module)
            if _agrees(module, formula):
                return formula
    return FP32Norm(module)


@torch.no_grad()
def _computes_in_fp32(module: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a norm gives, bit for bit, what its float32 replacement would in this run's
    dtype (a norm of a float32 model does; one computing in bf16 inside it does not)."""
    if isinstance(module, FP32_NORMS):
        return True
    replacement = _fp32_norm(module)
    shape = getattr(replacement, "normalized_shape", None) or _shape(module)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *shape, generator=gen).to(device=device, dtype=dtype)
    try:
        return bool(torch.equal(module(x), replacement(x)))
    except Exception:  # cannot run it here: leave the judgement to the swap
        return False


def layernorm_fp32(encoder: Encoder) -> FixReport:
    found = targets(encoder, _is_norm, final_norm=True)
    if not found:
        raise nothing("layernorm-fp32", "no norm module found in the blocks or the final norm")
    dtype, where = encoder.dtype, encoder.device.torch_device
    return replace_modules(
        encoder,
        "layernorm-fp32",
        found,
        lambda m: _computes_in_fp32(m, dtype, where),
        _fp32_norm,
        already="already float32",
        did=lambda n, old, new: (
            f"replaced {count(n, 'norm module')} ({old}) with float32 norms ({new})"
        ),
    )


TEMPLATE = """\
# layernorm-fp32: every norm in the blocks, and the final norm, computes in float32
# (its weights kept in float32, its input upcast) and casts its output back
class FP32Norm(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm.float()

    def forward(self, x):
        return self.norm(x.float()).to(x.dtype)


def is_norm(module):
    weight = getattr(module, "weight", None)
    named = "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor)
    return named or isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm))


for block in blocks:
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if is_norm(child):
                setattr(parent, name, FP32Norm(child))
if final_norm:
    owner_name, _, name = final_norm.rpartition(".")
    owner = model.get_submodule(owner_name)
    setattr(owner, name, FP32Norm(getattr(owner, name)))
"""

FIX = Fix(
    "layernorm-fp32",
    "compute every norm (LayerNorm, RMSNorm, ...) in float32, cast back",
    layernorm_fp32,
    TEMPLATE,
)
