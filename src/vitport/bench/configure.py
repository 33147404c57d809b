"""Speed settings of an Encoder: the attention backend and torch.compile."""

from __future__ import annotations

from collections.abc import Sequence

from vitport.encoder import Encoder
from vitport.errors import VitportError
from vitport.fixes import SDPAForward

ATTENTION = ("default", "eager", "sdpa", "flash")


def check_attention(kind: str) -> None:
    """The attention settings there are (see set_attention)."""
    if kind not in ATTENTION:
        raise VitportError(
            f"attention={kind} is unknown; choose one of {', '.join(ATTENTION)}",
            params=("attention=",),
        )


DEFAULT_BUDGET = 600.0  # seconds: a newcomer gets an answer in minutes


def check_budget(budget: str | float | None, optimize: bool) -> float | None:
    """A time budget bounds the --optimize search only: seconds, 'none' for no bound, or the
    default of 10 minutes when not given."""
    if budget is not None and not optimize:
        raise VitportError(
            "budget applies to optimize=True; add optimize=True or drop budget",
            params=("budget", "optimize=True"),
        )
    if budget is None:
        return DEFAULT_BUDGET
    if str(budget).strip().lower() == "none":
        return None
    try:
        seconds = float(budget)
    except ValueError:
        raise VitportError(
            f"budget={budget}: give seconds (e.g. 300) or 'none'", params=("budget=",)
        ) from None
    if seconds < 1:
        raise VitportError(
            f"budget={budget}: give at least 1 second, or 'none'", params=("budget=",)
        )
    return seconds


def check_e2e(paths: Sequence[object] | None) -> None:
    """End-to-end timing reads image files, so it needs some."""
    if not paths:
        raise VitportError(
            "e2e=True needs image files or a directory to read", params=("e2e=True",)
        )


def check_optimize_alone(
    *,
    dtype: str,
    attention: str,
    compiled: bool,
    fixes: Sequence[str],
    e2e: bool,
    csv: bool,
    markdown: bool,
    baseline: bool,
    runtime: str = "torch",
) -> None:
    """--optimize chooses dtype, attention and compile itself and writes JSON only: refuse the
    settings it would override and the outputs it does not write."""
    clashing = [
        param
        for param, given in (
            ("dtype=...", dtype != "fp32"),
            ("attention=...", attention != "default"),
            ("compiled=True", compiled),
            ("fixes=...", bool(fixes)),
            ("e2e=True", e2e),
            ("csv=True", csv),
            ("markdown=True", markdown),
            ("baseline=...", baseline),
            ("runtime=...", runtime != "torch"),
        )
        if given
    ]
    if clashing:
        instead = " (use runtimes)" if runtime != "torch" else ""
        raise VitportError(
            "optimize=True chooses dtype, attention and compile itself and writes json=True only; "
            f"drop {', '.join(clashing)}{instead}",
            params=("optimize=True", "json=True", *clashing, *(["runtimes"] if instead else [])),
        )


def set_attention(encoder: Encoder, kind: str) -> None:
    """eager: plain matmul-softmax-matmul; sdpa: torch's fused attention; flash: sdpa's flash
    kernel only (fails where the device or dtype has none); default: as the model was loaded."""
    check_attention(kind)
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


def compile_encoder(encoder: Encoder, mode: str | None = None) -> None:
    """torch.compile the module in place (names and hooks stay as they are). The batch size is
    dynamic from the start: one graph serves every batch of 2 or more (dynamo gives batch 1 a
    graph of its own), where the default would compile the first size statically as well."""
    encoder.module.compile(mode=mode, dynamic=True)


def configure(encoder: Encoder, attention: str = "default", compiled: bool = False) -> Encoder:
    set_attention(encoder, attention)
    if compiled:
        compile_encoder(encoder)
    return encoder
