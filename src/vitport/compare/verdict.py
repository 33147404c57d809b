"""Thresholds as data, and the verdict they give on a comparison.

A threshold names a metric, a limit and optionally a group ("" = every group, the Polygraphy
convention; a threshold for a named group overrides the "" one there). Errors must stay strictly
below their limit, similarities (HIGHER_IS_BETTER) strictly above it. Tensor metrics are judged on
their worst value over the inputs, batch metrics (top1/top5, knn_*) on their value over the set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vitport import records
from vitport.compare.metrics import (
    ALL_METRICS,
    GROUPS,
    HIGHER_IS_BETTER,
    METRIC_GROUPS,
    NONFINITE,
    GroupResult,
    compare_groups,
    decode_float,
    encode_float,
    plain_float,
    worst_rel_error,
)


@dataclass(frozen=True)
class Threshold:
    """``metric`` must be below ``limit`` (errors) or above it (similarities) in ``group``."""

    metric: str
    limit: float
    group: str = ""  # "" = every group; a named group overrides the "" default there

    @property
    def higher_is_better(self) -> bool:
        return self.metric in HIGHER_IS_BETTER

    def key(self) -> tuple[str, str]:
        return (self.group, self.metric)

    def spec(self) -> str:
        """The CLI form, e.g. ``cls.cos_worst=0.9999``."""
        name = f"{self.group}.{self.metric}" if self.group else self.metric
        return f"{name}={self.limit}"


def _defaults(
    dtype_limits: dict[str, float], batch_limits: dict[str, float]
) -> tuple[Threshold, ...]:
    """Limits on every group, then limits on the one group that has each batch metric."""
    every = tuple(Threshold(metric, limit) for metric, limit in dtype_limits.items())
    batch = tuple(
        Threshold(metric, limit, METRIC_GROUPS[metric][0]) for metric, limit in batch_limits.items()
    )
    return every + batch


DEFAULT_THRESHOLDS: dict[str, tuple[Threshold, ...]] = {
    "fp32": _defaults({"rel_error": 0.01, "cos_worst": 0.999}, {"top1": 0.99, "knn_top1": 0.99}),
    "fp16": _defaults({"rel_error": 0.02, "cos_worst": 0.995}, {"top1": 0.95, "knn_top1": 0.95}),
    "bf16": _defaults({"rel_error": 0.05, "cos_worst": 0.99}, {"top1": 0.9, "knn_top1": 0.9}),
}

_COMMON = (
    " rel_error is mean|ref - out| / mean|ref| over one input's tensor, judged on the worst input;"
    " cos_worst is the cosine of the single worst token, so one broken token (a misplaced register"
    " or position embedding) fails even when the mean error hides it. Errors accumulate over the"
    " 12-40 residual blocks of ViT-S to ViT-g, roughly as sqrt(depth): ViT-g is about 1.8x ViT-S."
    " top1 and knn_top1 are fractions of inputs, so with few inputs every one must agree; a"
    " near-tie (top-2 logits or neighbour similarities closer than the measured error) can flip"
    " legitimately: add inputs or override logits.top1 / pooled.knn_top1. top5 and knn_spearman"
    " are reported but not gated by default: at small batch sizes they are coarse (with 3 inputs"
    " each Spearman rho is +1 or -1) and the 5th/6th-class boundary says nothing about the port."
    " Beside each error compare shows the noise floor of the candidate's dtype: for fp32 (and"
    " fp64) the same metric between fp32 and fp64 on the CPU; for fp16 and bf16 the error that"
    " dtype alone costs, fp64 on the weights and input rounded to it against fp64 on the exact"
    " ones. x floor is the error over that floor: near 1, the error is what the dtype costs anyway."
)

THRESHOLD_REASONS: dict[str, str] = {
    "fp32": (
        "fp32 (and fp64, which uses these): rel_error < 1% and cos_worst > 0.999 on every group,"
        " the limits the hand-made ports used (relative error < 1%, cosine > 0.999)."
        " fp32's unit roundoff is 2^-24 (6e-6%); a faithful port lands at 1e-4% to 0.01%, and"
        " about 0.1% where a backend runs fp32 matmuls as TF32, so 1% is far above honest rounding yet"
        " catches real defects: a wrong GELU gave 1.3% in fp32 on a ViT-L. cos_worst > 0.999"
        " lets no token turn more than 2.6 degrees (about 4.5% relative L2 error)."
        " logits top1 > 99% and pooled knn_top1 > 99%: below 100 inputs every argmax and every"
        " nearest neighbour must agree; fp32 error is far below real margins." + _COMMON
    ),
    "fp16": (
        "fp16: rel_error < 2% and cos_worst > 0.995. fp16 keeps 11 significant bits (10 stored),"
        " unit roundoff 2^-11 (0.049%), but its range is narrow: above 65504 it overflows and"
        " below 6.1e-5 it goes subnormal, where LayerScale gammas (1e-5 to 1e-1 in DINOv2) and"
        " small activations lose digits. So observed errors exceed what the mantissa suggests:"
        " a trained DINOv2 ViT-S/14 in fp16 gave a CLS relative error of about 0.9% against fp32."
        " 2% leaves about 2x headroom, enough for ViT-g's depth, and stays tight enough that a"
        " gross defect does not pass. cos_worst > 0.995: no token turns more than 5.7 degrees"
        " (about 10% relative L2 error). logits top1 > 95% and pooled knn_top1 > 95%: below 20"
        " inputs all must agree." + _COMMON
    ),
    "bf16": (
        "bf16: rel_error < 5% and cos_worst > 0.99. bf16 keeps fp32's range but only 8"
        " significant bits (7 stored), unit roundoff 2^-8 (0.39%): rounding the weights and"
        " inputs alone costs about 0.4% per element before any arithmetic. A trained DINOv2"
        " ViT-S/14 with bf16 weights and inputs gave a CLS relative error of about 1.2% against"
        " fp32; 5% leaves about 4x headroom for deeper models and for devices that accumulate in"
        " bf16. An absolute limit cannot separate a small defect (1-2%) from bf16 rounding: for"
        " that read x floor, against the bf16 floor (the demo ViT-S/14 in bf16 lands at about"
        " 1.5x it). cos_worst > 0.99: no token turns more than 8.1 degrees (about 14% relative L2 error). logits top1"
        " > 90% and pooled knn_top1 > 90%: below 10 inputs all must agree." + _COMMON
    ),
}


def _thresholds_key(dtype: str | torch.dtype) -> str:
    """The DEFAULT_THRESHOLDS key for ``dtype``: fp64 uses fp32's."""
    from vitport.device import dtype_key

    key = dtype_key(dtype)
    key = "fp32" if key == "fp64" else key
    if key not in DEFAULT_THRESHOLDS:
        valid = ", ".join([*DEFAULT_THRESHOLDS, "fp64"])
        shown = dtype.strip().lower().removeprefix("torch.") if isinstance(dtype, str) else dtype
        raise ValueError(f"no default thresholds for dtype {str(shown)!r}; use one of {valid}")
    return key


def parse_threshold_overrides(items: Sequence[str]) -> list[Threshold]:
    """Parse CLI overrides ``metric=limit`` or ``group.metric=limit``."""
    thresholds: list[Threshold] = []
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise ValueError(
                f"threshold {item!r} is not metric=limit or group.metric=limit"
                " (e.g. rel_error=0.02 or rel_error=2%, cls.cos_worst=0.9999)"
            )
        group, dot, metric = name.rpartition(".")
        if dot and group not in GROUPS:
            raise ValueError(
                f"unknown group {group!r} in threshold {item!r}; valid groups: {', '.join(GROUPS)}"
            )
        if metric not in ALL_METRICS:
            raise ValueError(
                f"unknown metric {metric!r} in threshold {item!r};"
                f" valid metrics: {', '.join(ALL_METRICS)}"
            )
        allowed = METRIC_GROUPS.get(metric)
        if dot and allowed and group not in allowed:
            raise ValueError(
                f"metric {metric!r} exists only for group {', '.join(allowed)}, not {group!r}"
                f" (threshold {item!r})"
            )
        try:  # a percentage (2%) or a fraction (0.02)
            limit = float(value.removesuffix("%")) / (100 if value.endswith("%") else 1)
        except ValueError:
            raise ValueError(
                f"limit {value!r} in threshold {item!r} is not a number (e.g. 0.02, 2%, 1e-3)"
            ) from None
        if math.isnan(limit):
            raise ValueError(f"limit in threshold {item!r} is NaN; give a number")
        if metric in HIGHER_IS_BETTER and limit >= 1:
            raise ValueError(
                f"threshold {item!r} can never pass: {metric} is at most 1 and must be above "
                "the limit; give a limit below 1 (e.g. 0.999)"
            )
        if metric not in HIGHER_IS_BETTER and limit <= 0:
            raise ValueError(
                f"threshold {item!r} can never pass: {metric} is never below {limit:g}; give a "
                "positive limit (e.g. 0.02)"
            )
        thresholds.append(Threshold(metric, limit, group))
    return thresholds


def thresholds_for(
    dtype: str | torch.dtype, overrides: Sequence[Threshold] = ()
) -> list[Threshold]:
    """The defaults for ``dtype`` (fp64 uses fp32's) with the overrides applied.

    A group-specific override replaces the default of the same (group, metric); an override
    for every group ("" group) replaces that metric's defaults in every group, so
    ``top1=0.5`` also overrides the ``logits.top1`` default."""
    result = list(DEFAULT_THRESHOLDS[_thresholds_key(dtype)])
    for override in overrides:
        replaced = [
            t.key() == override.key() if override.group else t.metric == override.metric
            for t in result
        ]
        if any(replaced):
            first = replaced.index(True)
            result = [t for t, gone in zip(result, replaced, strict=True) if not gone]
            result.insert(first, override)
        else:
            result.append(override)
    return result


def unused_limits(thresholds: Sequence[Threshold], groups: Iterable[str]) -> list[Threshold]:
    """The thresholds that name a group the model does not output, so judge nothing (e.g. a
    logits limit for a model without a classifier head)."""
    present = set(groups)
    return [t for t in thresholds if t.group and t.group not in present]


@dataclass(frozen=True)
class Check:
    """One threshold applied to one group."""

    group: str
    metric: str
    value: float
    limit: float
    passed: bool
    higher_is_better: bool
    needed: float  # the loosest limit this value meets: the value itself (Polygraphy's tolerance)

    def __post_init__(self) -> None:
        for name in ("value", "limit", "needed"):  # one NaN object, so equal checks compare equal
            object.__setattr__(self, name, plain_float(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (inf/nan as strings)."""
        return records.to_dict(self, value=encode_float, limit=encode_float, needed=encode_float)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Check:
        return records.from_dict(
            cls, d, value=decode_float, limit=decode_float, needed=decode_float
        )


@dataclass(frozen=True)
class Verdict:
    """All checks of a comparison; true when there is at least one and all passed."""

    checks: tuple[Check, ...]

    def __bool__(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": bool(self), **records.to_dict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Verdict:
        return records.from_dict(
            cls, {"checks": [], **d}, checks=lambda cs: tuple(Check.from_dict(c) for c in cs)
        )


def _passes(value: float, limit: float, higher_is_better: bool) -> bool:
    if not math.isfinite(value):
        return False
    return value > limit if higher_is_better else value < limit


def judge(results: Mapping[str, GroupResult], thresholds: Sequence[Threshold]) -> Verdict:
    """Apply ``thresholds`` to every group of ``results``.

    Per group, a threshold naming the group beats a "" one for the same metric (the last of
    equals wins); a metric the group lacks is skipped. A group whose output held NaN/inf gets a
    failing ``nonfinite`` check whatever the thresholds say.
    """
    checks: list[Check] = []
    for group, result in results.items():
        chosen: dict[str, Threshold] = {}
        for t in thresholds:
            if t.group == "":
                chosen[t.metric] = t
        for t in thresholds:
            if t.group == group:
                chosen[t.metric] = t
        for metric, t in chosen.items():
            if metric in result.batch:
                value = result.batch[metric]
            elif metric in result.worst:
                value = result.worst[metric]
            else:
                continue
            hib = metric in HIGHER_IS_BETTER
            checks.append(
                Check(group, metric, value, t.limit, _passes(value, t.limit, hib), hib, value)
            )
        nonfinite = result.batch.get(NONFINITE, 0.0)
        if nonfinite != 0.0:  # NaN too
            checks.append(Check(group, NONFINITE, nonfinite, 1.0, False, False, nonfinite))
    return Verdict(tuple(checks))


@dataclass(frozen=True)
class Judgement:
    """One run judged against its reference: the metrics per group and the verdict on them."""

    groups: dict[str, GroupResult]
    verdict: Verdict

    def __bool__(self) -> bool:
        return bool(self.verdict)

    @property
    def worst_rel_error(self) -> float:
        return worst_rel_error(self.groups)


def judge_features(
    ref: Mapping[str, torch.Tensor],
    out: Mapping[str, torch.Tensor],
    thresholds: Sequence[Threshold],
) -> Judgement:
    """The one run-then-judge step: compare output groups with the reference, apply limits."""
    groups = compare_groups(ref, out)
    return Judgement(groups, judge(groups, thresholds))
