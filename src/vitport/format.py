"""Numbers as text, the same in the CLI tables and the report. No computation happens here."""

from __future__ import annotations

import math
from collections.abc import Sequence


def num(value: float | None) -> str:
    """Three significant digits; 'n/a' for a missing or NaN value."""
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.3g}"


SCIENTIFIC_BELOW = 1e-3  # percent: a column holding a smaller nonzero value is all e-notation
PERCENT_METRICS = frozenset({"rel_error", "vec_rel_error", "top1", "top5", "knn_top1"})
"""Metrics that are fractions (relative errors, shares of inputs): always shown as percentages."""


def pct(value: float | None) -> str:
    """A relative error or agreement as a percentage, three significant digits: ``1.07%``,
    ``0.0123%``; below 0.001% in e-notation (``9.37e-05%``)."""
    return pct_column([value])[0]


def pct_column(values: Sequence[float | None]) -> list[str]:
    """One table column of percentages, as :func:`pct`, but one notation for the whole column:
    e-notation for every value when any nonzero one is below 0.001%, plain otherwise."""
    finite = [100 * abs(v) for v in values if v is not None and math.isfinite(v) and v != 0]
    scientific = any(p < SCIENTIFIC_BELOW for p in finite)
    return [_percent(v, scientific) for v in values]


def _percent(value: float | None, scientific: bool) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    percent = 100 * value
    if percent == 0:
        return "0%"
    if scientific:
        return f"{percent:.2e}%"
    rounded = float(f"{percent:.3g}")  # 9.996 -> 10.0, so the digits are counted after rounding
    decimals = max(0, 2 - math.floor(math.log10(abs(rounded))))
    return f"{rounded:.{decimals}f}%"


def limit(metric: str, value: float) -> str:
    """A threshold's limit as given, in its metric's unit: ``5%`` for rel_error, ``0.99`` for a
    cosine."""
    return f"{100 * value:g}%" if metric in PERCENT_METRICS else f"{value:g}"


def metric_value(metric: str, value: float) -> str:
    """A measured value of `metric` in its unit: a percentage (:func:`pct`) or four digits."""
    if metric in PERCENT_METRICS:
        return pct(value)
    return f"{value:.4g}"


def share(value: float | None) -> str:
    """A utilisation such as MFU, one decimal."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


def ratio(value: float | None) -> str:
    """How many times a value is another ('x floor'): whole numbers from 10 up, one decimal below."""
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:,.0f}x" if value >= 10 else f"{value:.1f}x"


def improvement(before: float, after: float) -> str:
    """How many times smaller the error became: 'exact' when it vanished, '-' when both are 0."""
    if after == 0:
        return "-" if before == 0 else "exact"
    if after > before:
        return "worse"
    return f"{before / after:.2g}x"


def gib(value: int | None) -> str:
    """Bytes in GiB, two decimals."""
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def count(number: int, noun: str, plural: str | None = None) -> str:
    """'1 image', '2 images', '0 images': a count with its noun in the right number."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"
