"""Speed settings of an Encoder: the attention backend and torch.compile."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vitport.encoder import Encoder, RawOutput
from vitport.errors import VitportError

ATTENTION = ("default", "eager", "sdpa", "flash")


class FlashForward:
    """Run the family forward with scaled_dot_product_attention limited to its flash kernel."""

    def __init__(self, forward: Callable[[nn.Module, torch.Tensor], RawOutput]) -> None:
        self.forward = forward

    def __call__(self, module: nn.Module, pixels: torch.Tensor) -> RawOutput:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return self.forward(module, pixels)


def set_attention(encoder: Encoder, kind: str) -> None:
    """eager: plain matmul-softmax-matmul; sdpa: torch's fused attention; flash: sdpa's flash
    kernel only (fails where the device or dtype has none); default: as the model was loaded."""
    if kind not in ATTENTION:
        raise VitportError(f"--attn {kind} is unknown; choose one of {', '.join(ATTENTION)}")
    if kind == "flash" and not encoder.device.flash_selectable:
        raise VitportError(
            "--attn flash: on the NPU torch_npu picks its fused attention kernel itself "
            "(its own _fused_sdp_choice); use --attn sdpa"
        )
    if kind == "default":
        return
    impl = "eager" if kind == "eager" else "sdpa"
    if hasattr(encoder.module, "set_attn_implementation"):  # transformers
        encoder.module.set_attn_implementation(impl)
    else:  # timm: each Attention module decides with its fused_attn flag
        found = [m for m in encoder.module.modules() if hasattr(m, "fused_attn")]
        if not found:
            raise VitportError(f"{encoder.spec}: cannot switch its attention implementation")
        for module in found:
            module.fused_attn = impl == "sdpa"
    if kind == "flash":
        encoder.forward_fn = FlashForward(encoder.forward_fn)


def compile_encoder(encoder: Encoder, mode: str | None = None) -> None:
    """torch.compile the module in place (names and hooks stay as they are)."""
    encoder.module.compile(mode=mode)


def configure(encoder: Encoder, attention: str = "default", compiled: bool = False) -> Encoder:
    set_attention(encoder, attention)
    if compiled:
        compile_encoder(encoder)
    return encoder
