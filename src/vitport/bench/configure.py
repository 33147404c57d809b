"""The checks of bench's settings before anything loads: attention, budget, --e2e, --optimize.
(Setting the attention and compiling belong to the torch runners, vitport.runtimes.)"""

from __future__ import annotations

from collections.abc import Sequence

from vitport.errors import VitportError
from vitport.runtimes.base import ATTENTIONS as ATTENTION


def check_attention(kind: str) -> None:
    """The attention settings there are (see vitport.runtimes.torch_runner.set_attention)."""
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
