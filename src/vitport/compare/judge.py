"""Judging, kept apart from running (as Polygraphy's `compare_accuracy`): a run's metrics per
output group, the limits applied to them, the verdict, and each error set against its floor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vitport.compare.floors import Floors
from vitport.compare.metrics import GroupResult, floor_ratios, patch_error_map
from vitport.compare.sides import Run
from vitport.compare.verdict import Threshold, Verdict, judge_features


@dataclass(frozen=True)
class Judged:
    """One run judged: metrics per group, the verdict on them, and their ratios to the floor."""

    groups: dict[str, GroupResult]
    verdict: Verdict
    floor_ratio: dict[str, dict[str, float]]
    patch_error_map: list[list[float]]  # first input, grid h x w


def judge_run(run: Run, floors: Floors, thresholds: Sequence[Threshold]) -> Judged:
    """The candidate's Features against the reference's, under `thresholds`."""
    judged = judge_features(
        run.reference_features.groups(), run.candidate_features.groups(), thresholds
    )
    return Judged(
        judged.groups,
        judged.verdict,
        floor_ratios(judged.groups, floors.floor),
        patch_error_map(run.reference_features, run.candidate_features),
    )
