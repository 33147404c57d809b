"""erf-gelu: every GELU in the blocks computes the exact erf formula (the NPU's own kernel on an
NPU), for a model trained with exact GELU whose device runs an approximation.

A model trained with an approximation (CLIP's quick-GELU, SigLIP's tanh GELU: the activation its
`Architecture` records) keeps it: there the fix does not apply, as it would change the model's
own function."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitport.device.npu import NPU_GELU, npu_gelu
from vitport.encoder import Encoder
from vitport.fixes.base import Fix, FixReport, kinds, nothing, replace_modules, targets
from vitport.format import count


class ExactGELU(nn.Module):
    """GELU with the exact erf formula; on an NPU through the NPU's own kernel.

    The kernel is chosen when the fix is applied, from the encoder's device: apply the fix
    after moving the encoder (re-applying refreshes the choice).
    """

    def __init__(self, npu: bool = False) -> None:
        super().__init__()
        self.npu = npu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.npu:
            return npu_gelu(x)
        return F.gelu(x, approximate="none")

    def extra_repr(self) -> str:
        return f"npu={self.npu}"


def _is_gelu(module: nn.Module) -> bool:
    return isinstance(module, nn.GELU) or "gelu" in type(module).__name__.lower()


def _is_activation(module: nn.Module) -> bool:
    return "activation" in type(module).__module__


@torch.no_grad()
def _computes_exact_gelu(module: nn.Module, device: Any) -> bool:
    """Whether a GELU module already computes the exact erf GELU on `device`, a vitport
    Device (tanh and sigmoid
    approximations miss it by 1e-4 and more; float32 rounding stays far below 1e-5)."""
    x = torch.linspace(-6.0, 6.0, 1201)
    want = F.gelu(x.double(), approximate="none").float()
    try:
        got = module(x.to(device.torch_device)).float().cpu()
    except Exception:  # cannot run it here: leave the judgement to the swap
        return False
    return got.shape == want.shape and bool((got - want).abs().max() <= 1e-5)


@torch.no_grad()
def trained_with_exact_gelu(activation: str) -> bool:
    """Whether the activation a model was trained with (a transformers name, see
    `Architecture.activation`) is the exact erf GELU; an unknown name is not."""
    from transformers.activations import ACT2FN

    try:
        module = ACT2FN[activation]
    except KeyError:
        return False
    x = torch.linspace(-6.0, 6.0, 1201, dtype=torch.float64)
    return bool(torch.allclose(module(x), F.gelu(x, approximate="none"), rtol=0, atol=1e-12))


def erf_gelu(encoder: Encoder) -> FixReport:
    found = targets(encoder, _is_gelu)
    if not found:
        acts = [m for b in encoder.blocks for m in b.modules() if _is_activation(m)]
        uses = f"its activations: {kinds(acts)}" if acts else "no activation modules"
        raise nothing(
            "erf-gelu",
            f"this model has no GELU module in its blocks ({uses}); the fix does not apply",
        )
    trained = encoder.arch.activation
    if trained and not trained_with_exact_gelu(trained):
        raise nothing(
            "erf-gelu",
            f"this model was trained with {trained}, not exact GELU; the fix does not apply "
            "(it is for exact GELUs a device approximates, and would change this model's function)",
        )
    backend_kernel = encoder.device.exact_gelu_kernel()
    npu = backend_kernel is not None
    for _, module in found:
        if isinstance(module, ExactGELU):
            module.npu = npu
    kernel = backend_kernel or "torch.nn.functional.gelu"

    def exact(module: nn.Module) -> bool:
        return isinstance(module, ExactGELU) or _computes_exact_gelu(module, encoder.device)

    return replace_modules(
        encoder,
        "erf-gelu",
        found,
        exact,
        lambda _: ExactGELU(npu),
        already="already exact",
        did=lambda n, old, _: (
            f"replaced {count(n, 'GELU module')} ({old}) "
            f"with exact erf GELU ({kernel} approximate='none')"
        ),
    )


TEMPLATE = f"""\
# erf-gelu: every GELU in the blocks computes the exact erf formula
# ({NPU_GELU}(approximate="none") on an NPU, F.gelu elsewhere)
class ExactGELU(nn.Module):
    def forward(self, x):
        if x.device.type == "npu":
            import torch_npu

            return torch_npu.npu_gelu(x, approximate="none")
        return F.gelu(x, approximate="none")


for block in blocks:
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GELU) or "gelu" in type(child).__name__.lower():
                setattr(parent, name, ExactGELU())
"""

FIX = Fix(
    "erf-gelu",
    f"replace every GELU in the blocks with exact erf GELU ({NPU_GELU} on NPU)",
    erf_gelu,
    TEMPLATE,
)
