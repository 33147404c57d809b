"""Tests of vitport.compare.verdict: default thresholds, overrides, and the verdict."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vitport.compare.metrics import ALL_METRICS, GROUPS, METRIC_GROUPS, GroupResult, compare_groups
from vitport.compare.verdict import (
    DEFAULT_THRESHOLDS,
    THRESHOLD_REASONS,
    Check,
    Threshold,
    Verdict,
    judge,
    parse_threshold_overrides,
    thresholds_for,
    unused_limits,
)


def _limits(dtype: str) -> dict[tuple[str, str], float]:
    return {t.key(): t.limit for t in DEFAULT_THRESHOLDS[dtype]}


def _result(group: str, worst: dict[str, float], batch: dict[str, float] | None = None):
    return GroupResult(group, [], dict(worst), dict(worst), dict(batch or {}))


# --------------------------------------------------------------------------- defaults


def test_default_thresholds_per_dtype() -> None:
    assert set(DEFAULT_THRESHOLDS) == {"fp32", "fp16", "bf16"}
    assert _limits("fp32") == {
        ("", "rel_error"): 0.01,
        ("", "cos_worst"): 0.999,
        ("logits", "top1"): 0.99,
        ("pooled", "knn_top1"): 0.99,
    }
    assert _limits("fp16")[("", "rel_error")] == 0.02
    assert _limits("fp16")[("", "cos_worst")] == 0.995
    assert _limits("bf16")[("", "rel_error")] == 0.05
    assert _limits("bf16")[("", "cos_worst")] == 0.99


def test_defaults_are_coherent() -> None:
    """Same checks for every dtype, loosening from fp32 to fp16 to bf16, on valid names."""
    keys = set(_limits("fp32"))
    order = ["fp32", "fp16", "bf16"]
    for dtype in order:
        assert set(_limits(dtype)) == keys
        for t in DEFAULT_THRESHOLDS[dtype]:
            assert t.metric in ALL_METRICS
            assert t.group == "" or t.group in GROUPS
            assert t.group in METRIC_GROUPS.get(t.metric, ("",))
    for tighter, looser in zip(order, order[1:], strict=False):
        for key in keys:
            a, b = _limits(tighter)[key], _limits(looser)[key]
            higher = key[1] in ("cos_worst", "top1", "knn_top1")
            assert (a > b) if higher else (a < b), (tighter, looser, key)


def test_every_dtype_has_a_reason() -> None:
    assert set(THRESHOLD_REASONS) == set(DEFAULT_THRESHOLDS)
    for dtype, reason in THRESHOLD_REASONS.items():
        assert dtype in reason
        assert "\n" not in reason  # one paragraph
    assert "2^-8" in THRESHOLD_REASONS["bf16"]
    assert "2^-11" in THRESHOLD_REASONS["fp16"]


def test_thresholds_for_dtype_names() -> None:
    assert thresholds_for("fp32") == list(DEFAULT_THRESHOLDS["fp32"])
    assert thresholds_for("fp64") == list(DEFAULT_THRESHOLDS["fp32"])
    assert thresholds_for("bfloat16") == list(DEFAULT_THRESHOLDS["bf16"])
    assert thresholds_for(torch.float16) == list(DEFAULT_THRESHOLDS["fp16"])
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        thresholds_for("int8")


def test_thresholds_for_overrides_replace_in_place_or_append() -> None:
    replaced = Threshold("rel_error", 0.03)
    added = Threshold("cos_worst", 0.9999, "cls")
    result = thresholds_for("fp32", [replaced, added])
    assert result[0] == replaced
    assert result[-1] == added
    assert len(result) == len(DEFAULT_THRESHOLDS["fp32"]) + 1
    assert Threshold("rel_error", 0.01) not in result


# --------------------------------------------------------------------------- parsing


def test_parse_overrides() -> None:
    parsed = parse_threshold_overrides(
        ["rel_error=0.02", "cls.cos_worst=0.9999", " logits.top1 = 1e-1 ", "max_abs=inf"]
    )
    assert parsed == [
        Threshold("rel_error", 0.02),
        Threshold("cos_worst", 0.9999, "cls"),
        Threshold("top1", 0.1, "logits"),
        Threshold("max_abs", math.inf),
    ]
    assert parse_threshold_overrides([t.spec() for t in parsed]) == parsed


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("rel_eror=0.02", r"unknown metric 'rel_eror'.*valid metrics: rel_error, vec_rel_error"),
        ("head.rel_error=0.02", r"unknown group 'head'.*valid groups: cls, registers, patches"),
        ("rel_error=abc", r"limit 'abc'.*not a number"),
        ("rel_error=nan", r"NaN"),
        ("rel_error", r"not metric=limit"),
        ("=0.1", r"not metric=limit"),
        ("rel_error=", r"not metric=limit"),
        ("patches.top1=0.5", r"'top1' exists only for group logits"),
        ("logits.knn_top1=0.5", r"'knn_top1' exists only for group pooled"),
    ],
)
def test_parse_override_errors(item: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_threshold_overrides([item])
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- judge


def test_judge_uses_the_worst_input() -> None:
    ref = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    out = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0]])
    results = compare_groups({"cls": ref}, {"cls": out})
    assert results["cls"].mean["rel_error"] < 0.06  # the mean (0.05) would pass
    verdict = judge(results, [Threshold("rel_error", 0.06)])
    assert not verdict
    assert verdict.checks[0].value == pytest.approx(0.1)


def test_judge_boundary_error_metric() -> None:
    results = {"cls": _result("cls", {"rel_error": 0.01})}
    at = judge(results, [Threshold("rel_error", 0.01)])
    assert not at  # errors must be strictly below
    above = judge(results, [Threshold("rel_error", 0.0100001)])
    assert above
    check = at.checks[0]
    assert check == Check("cls", "rel_error", 0.01, 0.01, False, False, 0.01)
    assert check.needed == 0.01


def test_judge_boundary_similarity_metric() -> None:
    results = {"pooled": _result("pooled", {"cos_worst": 0.999})}
    assert not judge(results, [Threshold("cos_worst", 0.999)])  # strictly above
    passed = judge(results, [Threshold("cos_worst", 0.9989)])
    assert passed
    assert passed.checks[0].higher_is_better
    assert passed.checks[0].needed == 0.999


def test_group_override_beats_default() -> None:
    results = {
        "cls": _result("cls", {"rel_error": 0.1}),
        "patches": _result("patches", {"rel_error": 0.1}),
    }
    thresholds = [Threshold("rel_error", 0.2, "cls"), Threshold("rel_error", 0.01)]
    verdict = judge(results, thresholds)
    assert [(c.group, c.limit, c.passed) for c in verdict.checks] == [
        ("cls", 0.2, True),
        ("patches", 0.01, False),
    ]
    assert verdict.failures == (verdict.checks[1],)


def test_judge_skips_metrics_a_group_lacks_and_reads_batch_metrics() -> None:
    results = {
        "patches": _result("patches", {"rel_error": 0.0}, {"nonfinite": 0.0}),
        "logits": _result("logits", {"rel_error": 0.0}, {"top1": 0.5, "nonfinite": 0.0}),
    }
    verdict = judge(results, [Threshold("top1", 0.9)])
    assert [(c.group, c.metric, c.value) for c in verdict.checks] == [("logits", "top1", 0.5)]
    assert not verdict


def test_nan_and_inf_values_fail() -> None:
    for value in (math.nan, math.inf, -math.inf):
        results = {"cls": _result("cls", {"rel_error": value, "cos_worst": value})}
        verdict = judge(results, [Threshold("rel_error", 1e9), Threshold("cos_worst", -1e9)])
        assert len(verdict.checks) == 2
        assert not any(c.passed for c in verdict.checks), value


def test_nan_output_gives_a_failing_verdict() -> None:
    ref = torch.randn(2, 5, 8)
    out = ref.clone()
    out[1, 2, 3] = math.nan
    results = compare_groups(
        {"patches": ref, "logits": ref[:, 0]}, {"patches": out, "logits": ref[:, 0]}
    )
    # even thresholds that ignore the damaged values cannot pass
    verdict = judge(results, [Threshold("top1", 0.5)])
    assert not verdict
    assert [(c.group, c.metric, c.value) for c in verdict.failures] == [
        ("patches", "nonfinite", 1.0)
    ]
    full = judge(results, thresholds_for("fp32"))
    failed = {(c.group, c.metric) for c in full.failures}
    assert {("patches", "rel_error"), ("patches", "cos_worst"), ("patches", "nonfinite")} <= failed
    assert not any(c.group == "logits" for c in full.failures)


def test_defaults_pass_a_faithful_port_and_fail_a_defect() -> None:
    torch.manual_seed(0)
    ref = {
        "cls": torch.randn(8, 32),
        "patches": torch.randn(8, 16, 32),
        "pooled": torch.randn(8, 32),
        "logits": torch.randn(8, 100) * 5,
    }
    faithful = {k: v + 1e-6 * torch.randn_like(v) for k, v in ref.items()}
    verdict = judge(compare_groups(ref, faithful), thresholds_for("fp32"))
    assert verdict
    assert {c.group for c in verdict.checks} == set(ref)
    defect = dict(faithful, patches=ref["patches"] * 1.02)  # a 2% systematic error
    bad = judge(compare_groups(ref, defect), thresholds_for("fp32"))
    assert [(c.group, c.metric) for c in bad.failures] == [("patches", "rel_error")]
    assert bad.failures[0].needed == pytest.approx(0.02)
    assert judge(compare_groups(ref, defect), thresholds_for("bf16"))


def test_verdict_bool() -> None:
    ok = Check("cls", "rel_error", 0.001, 0.01, True, False, 0.001)
    bad = Check("cls", "cos_worst", 0.9, 0.999, False, True, 0.9)
    assert not Verdict(())
    assert Verdict((ok,))
    assert not Verdict((ok, bad))
    assert Verdict((ok, bad)).failures == (bad,)
    assert not judge({}, thresholds_for("fp32"))


def test_verdict_json_round_trip() -> None:
    verdict = Verdict(
        (
            Check("cls", "rel_error", 0.001, 0.01, True, False, 0.001),
            Check("patches", "rel_error", math.inf, 0.01, False, False, math.inf),
            Check("patches", "cos_worst", math.nan, 0.999, False, True, math.nan),
            Check("pooled", "cos_worst", -math.inf, 0.999, False, True, -math.inf),
        )
    )
    text = json.dumps(verdict.to_dict(), allow_nan=False)
    data = json.loads(text)
    assert data["passed"] is False
    assert data["checks"][1]["value"] == "inf"
    assert data["checks"][2]["needed"] == "nan"
    assert data["checks"][3]["value"] == "-inf"
    assert Verdict.from_dict(data) == verdict
    good = Verdict((Check("cls", "rel_error", 0.001, 0.01, True, False, 0.001),))
    assert Verdict.from_dict(json.loads(json.dumps(good.to_dict()))) == good
    assert good.to_dict()["passed"] is True


def test_override_without_group_replaces_group_defaults() -> None:
    """`-t top1=0.5` must not be shadowed by the logits.top1 default."""
    limits = thresholds_for("fp32", parse_threshold_overrides(["knn_top1=0.5", "top1=0.5"]))
    chosen = {(t.metric, t.group, t.limit) for t in limits if t.metric in ("knn_top1", "top1")}
    assert chosen == {("knn_top1", "", 0.5), ("top1", "", 0.5)}


def test_a_limit_can_be_given_in_percent():
    assert parse_threshold_overrides(["rel_error=2%", "logits.top1=99%"]) == [
        Threshold("rel_error", 0.02),
        Threshold("top1", 0.99, "logits"),
    ]


def test_limits_print_in_their_metrics_unit():
    from vitport.format import limit, metric_value

    assert limit("rel_error", 0.05) == "5%" and limit("knn_top1", 0.9) == "90%"
    assert limit("cos_worst", 0.999) == "0.999"
    assert metric_value("vec_rel_error", 0.0123) == "1.23%"
    assert metric_value("cos_worst", 0.98765) == "0.9877"


def test_unused_limits_names_the_groups_the_model_lacks():
    limits = [
        Threshold("rel_error", 0.1),
        Threshold("top1", 0.9, "logits"),
        Threshold("cos_worst", 0.99, "cls"),
    ]
    assert unused_limits(limits, ["patches", "cls", "pooled"]) == [limits[1]]
    assert unused_limits(limits, {"cls": 1, "logits": 2}) == []
