"""Tests of vitport.compare.metrics against values computed by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vitport.compare.metrics import (
    ALL_METRICS,
    GROUPS,
    HIGHER_IS_BETTER,
    TENSOR_METRICS,
    GroupResult,
    _rank,
    compare_groups,
    floor_ratios,
    knn_metrics,
    logits_metrics,
    tensor_metrics,
)
from vitport.encoder import OUTPUT_GROUPS


def _unit(degrees: float) -> list[float]:
    rad = math.radians(degrees)
    return [math.cos(rad), math.sin(rad)]


def test_groups_mirror_the_encoder_contract() -> None:
    assert GROUPS == OUTPUT_GROUPS


def test_metric_names() -> None:
    assert TENSOR_METRICS == (
        "rel_error",
        "vec_rel_error",
        "max_abs",
        "mean_abs",
        "mse",
        "cos_mean",
        "cos_worst",
    )
    assert frozenset({"cos_mean", "cos_worst", "top1", "top5", "knn_top1", "knn_spearman"}) == (
        HIGHER_IS_BETTER
    )
    assert set(ALL_METRICS) == set(TENSOR_METRICS) | {"top1", "top5", "knn_top1", "knn_spearman"}


def test_tensor_metrics_by_hand() -> None:
    m = tensor_metrics(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 5.0]))
    # mean|diff| = 1/4, mean|ref| = 10/4
    assert m["rel_error"] == pytest.approx(0.25 / 2.5)
    assert m["vec_rel_error"] == pytest.approx(1 / math.sqrt(30))
    assert m["max_abs"] == 1.0
    assert m["mean_abs"] == 0.25
    assert m["mse"] == 0.25
    cos = 34 / math.sqrt(30 * 39)  # one token
    assert m["cos_mean"] == pytest.approx(cos)
    assert m["cos_worst"] == pytest.approx(cos)
    assert m["nonfinite"] == 0.0
    assert all(isinstance(v, float) for v in m.values())


def test_identical_tensors_are_perfect() -> None:
    x = torch.randn(5, 7)
    m = tensor_metrics(x, x.clone())
    assert m["rel_error"] == 0.0
    assert m["vec_rel_error"] == 0.0
    assert m["max_abs"] == 0.0
    assert m["mse"] == 0.0
    assert m["cos_mean"] == pytest.approx(1.0)
    assert m["cos_worst"] == pytest.approx(1.0)


def test_cosine_is_per_token_and_picks_the_worst() -> None:
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    out = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])  # scaling keeps cosine 1
    m = tensor_metrics(ref, out)
    assert m["cos_worst"] == pytest.approx(1 / math.sqrt(2))
    assert m["cos_mean"] == pytest.approx((2 + 1 / math.sqrt(2)) / 3)


def test_cosine_of_orthogonal_and_opposite_tokens() -> None:
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert tensor_metrics(ref, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))["cos_worst"] == 0.0
    opposite = tensor_metrics(ref, torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    assert opposite["cos_worst"] == pytest.approx(-1.0)
    assert opposite["cos_mean"] == pytest.approx(0.0)


def test_zero_reference() -> None:
    zero = torch.zeros(3, 4)
    same = tensor_metrics(zero, torch.zeros(3, 4))
    assert same["rel_error"] == 0.0
    assert same["vec_rel_error"] == 0.0
    assert same["cos_worst"] == 1.0
    differs = tensor_metrics(zero, torch.full((3, 4), 0.5))
    assert differs["rel_error"] == math.inf
    assert differs["vec_rel_error"] == math.inf
    assert differs["cos_worst"] == 0.0
    assert differs["max_abs"] == 0.5


def test_nonfinite_output_is_counted_and_poisons_the_metrics() -> None:
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m = tensor_metrics(ref, torch.tensor([1.0, math.nan, 3.0, math.inf]))
    assert m["nonfinite"] == 2.0
    assert math.isnan(m["rel_error"])
    assert math.isnan(m["cos_worst"])
    inf = tensor_metrics(ref, torch.tensor([1.0, 2.0, 3.0, math.inf]))
    assert inf["nonfinite"] == 1.0
    assert inf["rel_error"] == math.inf
    assert inf["max_abs"] == math.inf


def test_half_precision_inputs_are_upcast() -> None:
    # 300^2 overflows fp16 (max 65504); computed in float64 it is exact.
    m = tensor_metrics(torch.tensor([0.0], dtype=torch.float16), torch.tensor([300.0]).half())
    assert m["mse"] == 90000.0
    b = tensor_metrics(
        torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
        torch.tensor([1.0, 2.015625], dtype=torch.bfloat16),
    )
    assert b["mean_abs"] == 0.0078125


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        tensor_metrics(torch.zeros(2, 3), torch.zeros(3, 2))


def test_logits_top1_top5() -> None:
    ref = torch.tensor([[10.0, 9, 8, 7, 6, 0], [0, 10, 9, 8, 7, 6]])
    out = torch.tensor([[10.0, 9, 8, 7, 0, 6], [0, 9, 10, 8, 7, 6]])
    m = logits_metrics(ref, out)
    assert m["top1"] == 0.5  # row 0 agrees, row 1 does not
    assert m["top5"] == pytest.approx((4 / 5 + 5 / 5) / 2)


def test_logits_with_fewer_than_five_classes() -> None:
    m = logits_metrics(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[1.0, 2.0, 3.0]]))
    assert m["top1"] == 0.0
    assert m["top5"] == 1.0  # k = C = 3: the same three classes


def test_logits_row_with_nan_does_not_agree() -> None:
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = torch.tensor([[1.0, 0.0], [math.nan, 1.0]])
    m = logits_metrics(ref, out)
    assert m["top1"] == 0.5
    assert m["top5"] == 0.5


def test_logits_must_be_two_dimensional() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        logits_metrics(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))


def test_knn_detects_a_changed_neighbour() -> None:
    ref = torch.tensor([_unit(0), _unit(10), _unit(30), _unit(90)], dtype=torch.float64)
    # point 3 moves from 90 to 45 degrees: point 2's nearest becomes 3 instead of 1
    out = torch.tensor([_unit(0), _unit(10), _unit(30), _unit(45)], dtype=torch.float64)
    m = knn_metrics(ref, out)
    assert m["knn_top1"] == 0.75
    # rows 0, 1, 3 keep their order (rho 1); row 2: ref ranks (2, 3, 1), out (1, 2, 3): rho -0.5
    assert m["knn_spearman"] == pytest.approx((1 + 1 - 0.5 + 1) / 4)


def test_knn_identical_is_perfect_and_scale_free() -> None:
    x = torch.randn(6, 8)
    m = knn_metrics(x, 3 * x)
    assert m == {"knn_top1": 1.0, "knn_spearman": pytest.approx(1.0)}


def test_knn_accepts_any_neighbour_tied_in_the_reference() -> None:
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    out = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.01, 1.0]])  # breaks 0's tie towards 2
    assert knn_metrics(ref, out)["knn_top1"] == 1.0


def test_knn_needs_enough_inputs() -> None:
    assert knn_metrics(torch.randn(1, 4), torch.randn(1, 4)) == {}
    two = knn_metrics(torch.randn(2, 4), torch.randn(2, 4))
    assert set(two) == {"knn_top1"}
    assert two["knn_top1"] == 1.0  # with two inputs each one's only neighbour is the other


def test_knn_nan_output() -> None:
    out = torch.randn(3, 4)
    out[1, 2] = math.nan
    m = knn_metrics(torch.randn(3, 4), out)
    assert math.isnan(m["knn_top1"])
    assert math.isnan(m["knn_spearman"])


def test_rank_averages_ties() -> None:
    ranks = _rank(torch.tensor([3.0, 1.0, 2.0, 2.0]).numpy())
    assert ranks.tolist() == [4.0, 1.0, 2.5, 2.5]


def test_compare_groups_per_input_mean_and_worst() -> None:
    ref = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    out = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0]])
    result = compare_groups({"cls": ref}, {"cls": out})["cls"]
    assert result.group == "cls"
    assert [p["rel_error"] for p in result.per_input] == [0.0, pytest.approx(0.1)]
    assert result.mean["rel_error"] == pytest.approx(0.05)
    assert result.worst["rel_error"] == pytest.approx(0.1)
    cos = 34 / math.sqrt(30 * 39)
    assert result.worst["cos_worst"] == pytest.approx(cos)  # the minimum, not the maximum
    assert result.mean["cos_worst"] == pytest.approx((1 + cos) / 2)
    assert result.batch == {"nonfinite": 0.0}


def test_compare_groups_batch_metrics_and_order() -> None:
    torch.manual_seed(0)
    ref = {
        "patches": torch.randn(4, 6, 8),
        "pooled": torch.randn(4, 8),
        "logits": torch.randn(4, 10),
    }
    out = {k: v.clone() for k, v in reversed(ref.items())}
    results = compare_groups(ref, out)
    assert list(results) == ["patches", "pooled", "logits"]
    assert results["logits"].batch["top1"] == 1.0
    assert results["logits"].batch["top5"] == 1.0
    assert results["pooled"].batch["knn_top1"] == 1.0
    assert "top1" not in results["patches"].batch
    assert "knn_top1" not in results["logits"].batch
    assert len(results["patches"].per_input) == 4


def test_compare_groups_counts_nonfinite() -> None:
    ref = torch.ones(3, 5, 4)
    out = ref.clone()
    out[0, 1, 2] = math.nan
    out[2, 0, 0] = -math.inf
    result = compare_groups({"patches": ref}, {"patches": out})["patches"]
    assert result.batch["nonfinite"] == 2.0
    assert [p["nonfinite"] for p in result.per_input] == [1.0, 0.0, 1.0]
    assert math.isnan(result.worst["rel_error"])
    assert math.isnan(result.worst["cos_worst"])


def test_compare_groups_missing_group() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="output group 'logits' is missing from the device"):
        compare_groups({"cls": x, "logits": x}, {"cls": x})
    with pytest.raises(ValueError, match="output group 'pooled' is missing from the reference"):
        compare_groups({"cls": x}, {"cls": x, "pooled": x})


def test_compare_groups_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"'patches'.*\(2, 4, 3\).*\(2, 5, 3\)"):
        compare_groups({"patches": torch.zeros(2, 4, 3)}, {"patches": torch.zeros(2, 5, 3)})


def test_group_result_json_round_trip() -> None:
    ref = torch.randn(2, 3, 4)
    out = ref.clone()
    out[1, 0, 0] = math.nan
    results = compare_groups({"patches": ref, "cls": ref[:, 0]}, {"patches": out, "cls": ref[:, 0]})
    for result in results.values():
        text = json.dumps(result.to_dict(), allow_nan=False)  # inf/nan travel as strings
        back = GroupResult.from_dict(json.loads(text))
        assert back == result
    encoded = GroupResult("g", [], {"rel_error": math.inf}, {"cos_worst": -math.inf}, {}).to_dict()
    assert encoded["mean"] == {"rel_error": "inf"}
    assert encoded["worst"] == {"cos_worst": "-inf"}
    assert results["patches"].to_dict()["worst"]["rel_error"] == "nan"


def _result(group: str, **mean: float) -> GroupResult:
    return GroupResult(group, [], dict(mean), dict(mean), {})


def test_floor_ratios() -> None:
    measured = {
        "cls": _result("cls", rel_error=0.02, mse=0.0, max_abs=0.5, cos_worst=0.99),
        "patches": _result("patches", rel_error=0.01),
    }
    floor = {"cls": _result("cls", rel_error=0.01, mse=0.0, max_abs=0.0, cos_worst=0.999)}
    ratios = floor_ratios(measured, floor)
    assert list(ratios) == ["cls"]  # patches has no floor
    assert ratios["cls"]["rel_error"] == pytest.approx(2.0)
    assert ratios["cls"]["mse"] == 1.0  # 0 over a 0 floor
    assert ratios["cls"]["max_abs"] == math.inf  # above a 0 floor
    assert ratios["cls"]["cos_worst"] == pytest.approx(10.0)  # (1 - 0.99) / (1 - 0.999)


def test_floor_ratios_similarity_at_one_and_nan() -> None:
    measured = {"cls": _result("cls", cos_mean=1.0, cos_worst=math.nan)}
    floor = {"cls": _result("cls", cos_mean=1.0, cos_worst=1.0)}
    ratios = floor_ratios(measured, floor)["cls"]
    assert ratios["cos_mean"] == 1.0
    assert math.isnan(ratios["cos_worst"])
