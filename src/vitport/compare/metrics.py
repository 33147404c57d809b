"""Pure metrics that compare a device's output tensors with a reference.

Everything is computed in float64 on the CPU, whatever the inputs' dtype and device. The last axis
of a tensor is the feature axis: a ``[D]`` vector is one token, ``[N, D]`` are ``N`` tokens. A group
tensor's first axis is the input (image) index. Non-finite values in the output are counted
(``nonfinite``) and turn the metrics they touch into ``inf``/``nan``, never into a pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vitport import records
from vitport.encoder import OUTPUT_GROUPS, Features

GROUPS: tuple[str, ...] = OUTPUT_GROUPS  # the Features contract's output groups, in order

TENSOR_METRICS: tuple[str, ...] = (
    "rel_error",
    "vec_rel_error",
    "max_abs",
    "mean_abs",
    "mse",
    "cos_mean",
    "cos_worst",
)
LOGITS_METRICS: tuple[str, ...] = ("top1", "top5")
KNN_METRICS: tuple[str, ...] = ("knn_top1", "knn_spearman")
BATCH_METRICS: tuple[str, ...] = LOGITS_METRICS + KNN_METRICS
ALL_METRICS: tuple[str, ...] = TENSOR_METRICS + BATCH_METRICS
HIGHER_IS_BETTER: frozenset[str] = frozenset({"cos_mean", "cos_worst", *BATCH_METRICS})
# Metrics that exist for one group only; the tensor metrics exist for every group.
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "top1": ("logits",),
    "top5": ("logits",),
    "knn_top1": ("pooled",),
    "knn_spearman": ("pooled",),
}
NONFINITE = "nonfinite"


def plain_float(value: Any) -> float:
    """A plain float, with every NaN the same object (so results holding NaN compare equal)."""
    value = float(value)
    return math.nan if math.isnan(value) else value


def encode_float(value: float) -> float | str:
    """A JSON-safe float: inf/nan become the strings "inf", "-inf", "nan"."""
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def decode_float(value: float | str) -> float:
    """Inverse of :func:`encode_float`."""
    if isinstance(value, str) and value not in ("inf", "-inf", "nan"):
        raise ValueError(f"{value!r} is not a number; expected a float or 'inf', '-inf', 'nan'")
    return plain_float(value)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _check_same_shape(ref: torch.Tensor, out: torch.Tensor, what: str = "") -> None:
    if tuple(ref.shape) != tuple(out.shape):
        prefix = f"{what}: " if what else ""
        raise ValueError(
            f"{prefix}reference shape {tuple(ref.shape)} != output shape {tuple(out.shape)}"
        )


def _ratio(num: float, den: float) -> float:
    """num / den, with den == 0 read as: 0 when num is 0 too, else inf (nan stays nan)."""
    if math.isnan(num) or math.isnan(den):
        return math.nan
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _token_cosines(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each token (last axis = features); zero vs zero counts as 1."""
    dim = ref.shape[-1] if ref.ndim else 1
    a = ref.reshape(-1, dim)
    b = out.reshape(-1, dim)
    na = a.norm(dim=-1)
    nb = b.norm(dim=-1)
    cos = (a * b).sum(-1) / (na * nb)
    cos = torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos)
    cos = torch.where((na == 0) ^ (nb == 0), torch.zeros_like(cos), cos)
    return cos.clamp(-1.0, 1.0)  # rounding may step past 1; NaN stays NaN


def tensor_metrics(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """The TENSOR_METRICS of one input's tensor, plus ``nonfinite`` (count in ``out``)."""
    _check_same_shape(ref, out)
    r, o = _f64(ref), _f64(out)
    nonfinite = float((~torch.isfinite(o)).sum())
    if r.numel() == 0:
        return {
            **{m: 0.0 for m in TENSOR_METRICS},
            "cos_mean": 1.0,
            "cos_worst": 1.0,
            NONFINITE: 0.0,
        }
    diff = r - o
    absdiff = diff.abs()
    mean_abs = float(absdiff.mean())
    cos = _token_cosines(r, o)
    result = {
        "rel_error": _ratio(mean_abs, float(r.abs().mean())),
        "vec_rel_error": _ratio(float(diff.norm()), float(r.norm())),
        "max_abs": float(absdiff.max()),
        "mean_abs": mean_abs,
        "mse": float((diff * diff).mean()),
        "cos_mean": float(cos.mean()),
        "cos_worst": float(cos.min()),
        NONFINITE: nonfinite,
    }
    return {k: plain_float(v) for k, v in result.items()}


def logits_metrics(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean top-5 overlap of ``[B, C]`` logits (k = C when C < 5).

    An input whose output row holds a non-finite value counts as not agreeing.
    """
    _check_same_shape(ref, out, "logits")
    if ref.ndim != 2:
        raise ValueError(f"logits must be [B, C]; got shape {tuple(ref.shape)}")
    batch, classes = ref.shape
    if batch == 0 or classes == 0:
        return {}
    r, o = _f64(ref), _f64(out)
    finite = torch.isfinite(o).all(dim=1)
    top1 = (r.argmax(dim=1) == o.argmax(dim=1)) & finite
    k = min(5, classes)
    ref_top = r.topk(k, dim=1).indices.tolist()
    out_top = o.topk(k, dim=1).indices.tolist()
    overlaps = [
        len(set(a) & set(b)) / k if ok else 0.0
        for a, b, ok in zip(ref_top, out_top, finite.tolist(), strict=True)
    ]
    return {"top1": plain_float(top1.double().mean()), "top5": plain_float(sum(overlaps) / batch)}


def _rank(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (as Spearman's rho wants)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation; constant vs constant is 1, constant vs varying is 0."""
    ra = _rank(a) - (len(a) + 1) / 2
    rb = _rank(b) - (len(b) + 1) / 2
    da, db = float(np.sqrt((ra * ra).sum())), float(np.sqrt((rb * rb).sum()))
    if da == 0.0 or db == 0.0:
        return 1.0 if da == db else 0.0
    return float((ra * rb).sum() / (da * db))


def _cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, x / norms.clamp_min(1e-300), torch.zeros_like(x))
    return unit @ unit.T


def knn_metrics(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Do the inputs keep their neighbours? ``[B, D]`` pooled features, cosine similarity.

    ``knn_top1``: fraction of inputs whose nearest other input is the same under ref and out (an
    exact tie in the reference accepts any of the tied neighbours); needs B >= 2.
    ``knn_spearman``: mean over inputs of Spearman's rho between their similarities to all other
    inputs under ref and under out; needs B >= 3. Non-finite values make both NaN.
    """
    _check_same_shape(ref, out, "pooled")
    if ref.ndim != 2:
        raise ValueError(f"pooled features must be [B, D]; got shape {tuple(ref.shape)}")
    batch = ref.shape[0]
    if batch < 2:
        return {}
    r, o = _f64(ref), _f64(out)
    if not (torch.isfinite(r).all() and torch.isfinite(o).all()):
        result = {"knn_top1": math.nan}
        if batch >= 3:
            result["knn_spearman"] = math.nan
        return result
    sim_ref, sim_out = _cosine_matrix(r), _cosine_matrix(o)
    eye = torch.eye(batch, dtype=torch.bool)
    masked_ref = sim_ref.masked_fill(eye, -math.inf)
    masked_out = sim_out.masked_fill(eye, -math.inf)
    best_ref = masked_ref.max(dim=1).values
    nn_out = masked_out.argmax(dim=1)
    agree = masked_ref.gather(1, nn_out[:, None])[:, 0] >= best_ref
    result = {"knn_top1": plain_float(agree.double().mean())}
    if batch >= 3:
        off = ~eye.numpy()
        a, b = sim_ref.numpy(), sim_out.numpy()
        rhos = [_spearman(a[i][off[i]], b[i][off[i]]) for i in range(batch)]
        result["knn_spearman"] = plain_float(sum(rhos) / batch)
    return result


def _worst(metric: str, values: list[float]) -> float:
    if any(math.isnan(v) for v in values):
        return math.nan
    return min(values) if metric in HIGHER_IS_BETTER else max(values)


def _encode_dict(d: Mapping[str, float]) -> dict[str, float | str]:
    return {k: encode_float(v) for k, v in d.items()}


def _decode_dict(d: Mapping[str, float | str]) -> dict[str, float]:
    return {str(k): decode_float(v) for k, v in d.items()}


@dataclass(frozen=True)
class GroupResult:
    """How one output group of the device compares with the reference."""

    group: str
    per_input: list[dict[str, float]] = field(default_factory=list)  # in input order
    mean: dict[str, float] = field(default_factory=dict)  # mean over inputs
    worst: dict[str, float] = field(default_factory=dict)  # max of errors, min of similarities
    batch: dict[str, float] = field(default_factory=dict)  # top1/top5, knn_*, nonfinite total

    @classmethod
    def from_inputs(
        cls, group: str, per_input: list[dict[str, float]], batch: dict[str, float]
    ) -> GroupResult:
        """Aggregate per-input tensor metrics into mean and worst."""
        mean: dict[str, float] = {}
        worst: dict[str, float] = {}
        if per_input:
            for metric in TENSOR_METRICS:
                values = [p[metric] for p in per_input if metric in p]
                if len(values) == len(per_input):
                    mean[metric] = plain_float(sum(values) / len(values))
                    worst[metric] = plain_float(_worst(metric, values))
        return cls(group, per_input, mean, worst, batch)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (inf/nan as strings)."""
        return records.to_dict(
            self,
            per_input=lambda rows: [_encode_dict(p) for p in rows],
            mean=_encode_dict,
            worst=_encode_dict,
            batch=_encode_dict,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GroupResult:
        """Inverse of :meth:`to_dict`."""
        return records.from_dict(
            cls,
            d,
            per_input=lambda rows: [_decode_dict(p) for p in rows],
            mean=_decode_dict,
            worst=_decode_dict,
            batch=_decode_dict,
        )


def worst_rel_error(groups: Mapping[str, GroupResult] | None) -> float:
    """The worst relative error over the groups; ``inf`` when there are none (nothing ran, so
    nothing is known to be close)."""
    return max((g.worst.get("rel_error", 0.0) for g in (groups or {}).values()), default=math.inf)


def compare_groups(
    ref: Mapping[str, torch.Tensor], out: Mapping[str, torch.Tensor]
) -> dict[str, GroupResult]:
    """Compare every output group, in the order of ``ref``; both must hold the same groups."""
    for name in ref:
        if name not in out:
            raise ValueError(
                f"output group {name!r} is missing from the device output "
                f"(reference has {', '.join(ref)}; output has {', '.join(out) or 'none'})"
            )
    for name in out:
        if name not in ref:
            raise ValueError(
                f"output group {name!r} is missing from the reference "
                f"(output has {', '.join(out)}; reference has {', '.join(ref) or 'none'})"
            )
    results: dict[str, GroupResult] = {}
    for name, ref_tensor in ref.items():
        out_tensor = out[name]
        _check_same_shape(ref_tensor, out_tensor, f"group {name!r}")
        if ref_tensor.ndim == 0:
            raise ValueError(f"group {name!r} has no input axis (a scalar); expected [B, ...]")
        r, o = _f64(ref_tensor), _f64(out_tensor)
        per_input = [tensor_metrics(r[i], o[i]) for i in range(r.shape[0])]
        batch: dict[str, float] = {}
        if name == "logits" and r.ndim == 2:
            batch.update(logits_metrics(r, o))
        if name == "pooled" and r.ndim == 2:
            batch.update(knn_metrics(r, o))
        batch[NONFINITE] = plain_float(sum(p[NONFINITE] for p in per_input))
        results[name] = GroupResult.from_inputs(name, per_input, batch)
    return results


def _floor_ratio(measured: float, floor: float) -> float:
    if math.isnan(measured) or math.isnan(floor):
        return math.nan
    if floor == 0.0:
        return math.inf if measured > 0.0 else 1.0
    return measured / floor


def _shortfall(similarity: float) -> float:
    """1 - similarity, never below 0 (rounding can put a cosine a hair above 1); NaN stays."""
    return math.nan if math.isnan(similarity) else max(0.0, 1.0 - similarity)


def floor_ratios(
    measured: Mapping[str, GroupResult], floor: Mapping[str, GroupResult]
) -> dict[str, dict[str, float]]:
    """How many times the noise floor each mean metric is ("x floor"), per group in both.

    Errors: measured / floor. Similarities: (1 - measured) / (1 - floor). A zero floor gives inf
    when the measured value is above it, else 1.0.
    """
    ratios: dict[str, dict[str, float]] = {}
    for group, result in measured.items():
        if group not in floor:
            continue
        base = floor[group].mean
        row: dict[str, float] = {}
        for metric, value in result.mean.items():
            if metric not in base:
                continue
            if metric in HIGHER_IS_BETTER:
                m, f = _shortfall(value), _shortfall(base[metric])
            else:
                m, f = value, base[metric]
            row[metric] = plain_float(_floor_ratio(m, f))
        ratios[group] = row
    return ratios


def patch_error_map(ref: Features, out: Features, index: int = 0) -> list[list[float]]:
    """Relative error of each patch token of one input, laid out on the patch grid."""
    delta = (out.patches[index].double() - ref.patches[index].double()).abs().mean(-1)
    scale = ref.patches[index].double().abs().mean().clamp_min(1e-30)
    return (delta / scale).reshape(ref.grid).tolist()
