"""Plant a known fault in one block, to check that compare finds it and a fix cures it.

`gelu-tanh@7`: the block's GELU becomes the tanh approximation (what an imprecise device
kernel does; cured by the erf-gelu fix). `layernorm-bf16@3`: the block's norms compute in
bfloat16 (an imprecise norm kernel; cured by layernorm-fp32). `mlp-scale@5`: the block's MLP
output is 5 % too large (a wrongly converted weight). `norm-swap@2`: the block's two norms
trade weights (a key converter that swapped norm1 and norm2). The last two no precision fix
cures: they are weight errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitport.encoder import Encoder, block_parts, block_roles, is_norm
from vitport.errors import VitportError
from vitport.format import count
from vitport.hooks import first_tensor, replace_first_tensor
from vitport.registry import Registry


class TanhGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class BF16LayerNorm(nn.LayerNorm):
    """A LayerNorm whose arithmetic runs in bfloat16, like a low-precision device kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.bfloat16() if self.weight is not None else None
        bias = self.bias.bfloat16() if self.bias is not None else None
        out = F.layer_norm(x.bfloat16(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


def is_gelu(module: nn.Module) -> bool:
    return "gelu" in type(module).__name__.lower()


def replace_in(block: nn.Module, match: Callable[[nn.Module], bool], make) -> int:
    """Replace every sub-module of `block` that matches; returns how many."""
    count = 0
    for name, module in list(block.named_modules()):
        if name and match(module):
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, attr, make(module))
            count += 1
    return count


def bf16_norm(module: nn.Module) -> nn.Module:
    if not isinstance(module, nn.LayerNorm):
        raise VitportError(f"layernorm-bf16 needs a LayerNorm, found {type(module).__name__}")
    faulty = BF16LayerNorm(module.normalized_shape, eps=module.eps)
    faulty.load_state_dict(module.state_dict())
    return faulty.to(device=module.weight.device, dtype=module.weight.dtype)


class Scaled(nn.Module):
    """A module whose output is `factor` times the wrapped one's."""

    def __init__(self, inner: nn.Module, factor: float) -> None:
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return replace_first_tensor(
            out := self.inner(*args, **kwargs), first_tensor(out) * self.factor
        )


def scale_mlp(block: nn.Module) -> int:
    parts = block_parts(block)
    names = [n for n, role in block_roles(block).items() if role == "mlp"]
    for name in names:
        setattr(block, name, Scaled(parts[name], 1.05))
    return len(names)


def swap_norms(block: nn.Module) -> int:
    parts = block_parts(block)
    norms = [parts[n] for n, role in block_roles(block).items() if role == "norm"]
    if len(norms) < 2:
        return 0
    first, second = norms[:2]
    with torch.no_grad():
        for attr in ("weight", "bias"):
            a, b = getattr(first, attr, None), getattr(second, attr, None)
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                held = a.detach().clone()
                a.copy_(b)
                b.copy_(held)
    return 2


@dataclass(frozen=True)
class Fault:
    name: str
    cure: str
    apply: Callable[[nn.Module], int]  # changes one block in place; returns how many modules


def replacing(match: Callable[[nn.Module], bool], make) -> Callable[[nn.Module], int]:
    return lambda block: replace_in(block, match, make)


NO_CURE = "none (a weight error: fix the checkpoint conversion)"
FAULTS: Registry[Fault] = Registry("fault", param="inject_fault")
for _fault in (
    Fault("gelu-tanh", "erf-gelu", replacing(is_gelu, lambda _m: TanhGELU())),
    Fault("layernorm-bf16", "layernorm-fp32", replacing(is_norm, bf16_norm)),
    Fault("mlp-scale", NO_CURE, scale_mlp),
    Fault("norm-swap", NO_CURE, swap_norms),
):
    FAULTS.register(_fault.name, _fault)


def parse_fault(text: str) -> tuple[str, int]:
    name, _, block = text.partition("@")
    if name not in FAULTS or not block.isdigit():
        raise VitportError(
            f"inject_fault takes KIND@BLOCK with KIND one of {', '.join(FAULTS.names())}, "
            "e.g. gelu-tanh@7",
            params=("inject_fault",),
        )
    return FAULTS.get(name).name, int(block)


def inject(encoder: Encoder, text: str) -> str:
    """Plant the fault `KIND@BLOCK` in the encoder, in place; returns what was changed."""
    name, index = parse_fault(text)
    if not 0 <= index < len(encoder.blocks):
        raise VitportError(f"block {index} does not exist: the model has {len(encoder.blocks)}")
    fault = FAULTS.get(name)
    changed = fault.apply(encoder.blocks[index])
    if not changed:
        raise VitportError(f"fault {name} found nothing to change in block {index}")
    return f"planted {name} in block {index} ({count(changed, 'module')}); the fix that cures it: {fault.cure}"
