"""torch: the Encoder's own module, eager, at the setup's dtype and attention."""

from __future__ import annotations

from pathlib import Path

from vitport.encoder import Encoder
from vitport.errors import VitportError
from vitport.fixes import SDPAForward
from vitport.runtimes.base import (
    ATTENTIONS,
    DTYPES,
    RUNNERS,
    TORCH_DEVICES,
    Forward,
    Limits,
    Runner,
    Setup,
)


def set_attention(encoder: Encoder, kind: str) -> None:
    """eager: plain matmul-softmax-matmul; sdpa: torch's fused attention; flash: sdpa's flash
    kernel only (fails where the device or dtype has none); default: as the model was loaded."""
    if kind not in ATTENTIONS:
        raise VitportError(
            f"attention={kind} is unknown; choose one of {', '.join(ATTENTIONS)}",
            params=("attention=",),
        )
    if kind == "flash" and not encoder.device.flash_selectable:
        raise VitportError(
            "attention='flash': on the NPU torch_npu picks its fused attention kernel itself "
            "(its own _fused_sdp_choice); use attention='sdpa'",
            params=("attention='flash'", "attention='sdpa'"),
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
        encoder.forward_fn = SDPAForward(encoder.forward_fn, "FLASH_ATTENTION")


class TorchRunner(Runner):
    """The module as loaded, run eagerly; the attention setting switched in place."""

    name = "torch"
    limits = Limits(TORCH_DEVICES, DTYPES, attentions=ATTENTIONS)

    def build(self, encoder: Encoder, setup: Setup, cache: Path) -> Forward:
        set_attention(encoder, setup.attention)
        return encoder.forward_fn


RUNNERS.register(TorchRunner.name, TorchRunner)
