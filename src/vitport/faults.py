"""Plant a known fault in one block, to check that compare finds it and a fix cures it.

`gelu-tanh@7`: the block's GELU becomes the tanh approximation (what an imprecise device
kernel does; cured by the erf-gelu fix). `layernorm-bf16@3`: the block's norms compute in
bfloat16 (an imprecise norm kernel; cured by layernorm-fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitport.encoder import Encoder, is_norm
from vitport.errors import VitportError


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


@dataclass(frozen=True)
class Fault:
    name: str
    cure: str
    match: Callable[[nn.Module], bool]
    make: Callable[[nn.Module], nn.Module]


FAULTS = {
    f.name: f
    for f in (
        Fault("gelu-tanh", "erf-gelu", is_gelu, lambda _m: TanhGELU()),
        Fault("layernorm-bf16", "layernorm-fp32", is_norm, bf16_norm),
    )
}


def parse_fault(text: str) -> tuple[str, int]:
    name, _, block = text.partition("@")
    if name not in FAULTS or not block.isdigit():
        raise VitportError(
            f"--inject-fault takes KIND@BLOCK with KIND one of {', '.join(FAULTS)}, e.g. gelu-tanh@7"
        )
    return name, int(block)


def inject(encoder: Encoder, text: str) -> str:
    """Plant the fault `KIND@BLOCK` in the encoder, in place; returns what was changed."""
    name, index = parse_fault(text)
    if not 0 <= index < len(encoder.blocks):
        raise VitportError(f"block {index} does not exist: the model has {len(encoder.blocks)}")
    fault = FAULTS[name]
    count = replace_in(encoder.blocks[index], fault.match, fault.make)
    if not count:
        raise VitportError(f"fault {name} found nothing to change in block {index}")
    return f"planted {name} in block {index} ({count} modules); the fix that cures it: {fault.cure}"
