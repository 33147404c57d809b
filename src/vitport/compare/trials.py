"""Trying fixes: the candidate rebuilt with each fix (and with all that apply together), each
judged against the same reference on the same inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vitport import records
from vitport.compare.metrics import GroupResult, worst_rel_error
from vitport.compare.sides import Inputs, Progress, features_of, no_progress
from vitport.compare.verdict import Threshold, Verdict, judge_features
from vitport.encoder import Encoder, Features
from vitport.errors import VitportError
from vitport.fixes import process_settings_restored

MakeCandidate = Callable[[Sequence[str]], tuple[Encoder, str]]
"""make(fixes) -> a fresh candidate with those fixes applied, and what was changed."""


@dataclass(frozen=True)
class FixTrial:
    """The candidate with one fix (or all together) set against the same reference."""

    fixes: tuple[str, ...]
    groups: dict[str, GroupResult] | None
    verdict: Verdict | None
    detail: str  # what the fix changed, or why it does not apply

    @property
    def worst_rel_error(self) -> float:
        return worst_rel_error(self.groups)

    def to_dict(self) -> dict[str, Any]:
        return records.to_dict(self, groups=lambda groups: records.plain(groups or {}))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FixTrial:
        return records.from_dict(
            cls,
            data,
            groups=lambda groups: group_results(groups) or None,
            verdict=lambda verdict: Verdict.from_dict(verdict) if verdict else None,
        )


def group_results(data: dict[str, Any]) -> dict[str, GroupResult]:
    return {k: GroupResult.from_dict(v) for k, v in data.items()}


@dataclass(frozen=True, eq=False)
class TrialSetting:
    """What every trial is judged on: the reference's Features, the inputs and the limits."""

    reference: Features
    inputs: Inputs
    thresholds: tuple[Threshold, ...]
    batch_size: int = 4


def try_fix(
    make_candidate: MakeCandidate,
    fixes: tuple[str, ...],
    setting: TrialSetting,
    progress: Progress = no_progress,
) -> FixTrial:
    """The candidate rebuilt with `fixes`, judged; a fix that does not apply says why."""
    progress(f"trying {'+'.join(fixes)}")
    with process_settings_restored():  # a trial must not change the runs after it
        try:
            fixed, detail = make_candidate(fixes)
        except VitportError as exc:  # the fix does not apply to this model
            return FixTrial(fixes, None, None, str(exc))
        fixed_feats = features_of(fixed, setting.inputs, setting.batch_size)
    judged = judge_features(setting.reference.groups(), fixed_feats.groups(), setting.thresholds)
    return FixTrial(fixes, judged.groups, judged.verdict, detail)


def try_fixes(
    make_candidate: MakeCandidate,
    trials: Sequence[tuple[str, ...]],
    setting: TrialSetting,
    progress: Progress = no_progress,
) -> list[FixTrial]:
    """Each trial in turn, then every single fix that applied, all together."""
    done = [try_fix(make_candidate, tuple(trial), setting, progress) for trial in trials]
    applicable = tuple(t.fixes[0] for t in done if t.groups is not None)
    if len(applicable) > 1:
        done.append(try_fix(make_candidate, applicable, setting, progress))
    return done
