"""`compare`: a candidate (device, dtype, fixes) against a reference run or a golden file.

The comparison is a row of steps that each return data: run the sides into Features
(compare.sides), measure the floors (compare.floors), judge (compare.judge), localise
(compare.localize) and try fixes (compare.trials), on a check that compare.check assembles
alike for compare, report and serve."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from vitport import records
from vitport.compare.check import CheckPlan, reference_inputs
from vitport.compare.floors import Floors, floor_dtype_of, floor_kind, measure_floors
from vitport.compare.judge import Judged, judge_run
from vitport.compare.localize import Localization, Located, localize_run
from vitport.compare.metrics import GroupResult, decode_float, encode_float, worst_rel_error
from vitport.compare.sides import (
    Inputs,
    Progress,
    Run,
    Side,
    describe_side,
    features_of,
    input_batches,
    no_progress,
    pixel_batches,
    run_sides,
)
from vitport.compare.trials import FixTrial, MakeCandidate, TrialSetting, group_results, try_fixes
from vitport.compare.verdict import Threshold, Verdict
from vitport.device import Device
from vitport.encoder import Encoder, Features
from vitport.errors import VitportError
from vitport.runtimes.base import Setup

__all__ = [  # the steps' names stay importable from here, where they used to live
    "SCHEMA_VERSION",
    "CompareResult",
    "FixTrial",
    "Inputs",
    "Side",
    "candidate_factory",
    "compare",
    "describe_side",
    "features_of",
    "floor_dtype_of",
    "floor_kind",
    "input_batches",
    "pixel_batches",
    "run_check",
]

SCHEMA_VERSION = 1


@dataclass
class CompareResult:
    spec: str
    candidate: Side
    reference: Side
    inputs: list[str]
    groups: dict[str, GroupResult]
    floor: dict[str, GroupResult]  # the candidate dtype's floor: what x floor divides by
    floor_ratio: dict[str, dict[str, float]]
    thresholds: list[Threshold]
    verdict: Verdict
    floor_fp32: dict[str, GroupResult] = field(default_factory=dict)  # fp32 vs fp64, always
    floor_dtype: str = "fp32"  # the dtype whose own cost `floor` measures
    localization: Localization | None = None
    localization_reference: str = ""
    trials: list[FixTrial] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    patch_error_map: list[list[float]] = field(default_factory=list)  # first input, grid h x w

    @property
    def passed(self) -> bool:
        return bool(self.verdict)

    @property
    def worst_rel_error(self) -> float:
        return worst_rel_error(self.groups)

    @property
    def floor_kind(self) -> str:
        return floor_kind(self.floor_dtype)

    def best_trial(self) -> FixTrial | None:
        """The passing single fix that at least halves the worst relative error, the one that
        lowers it most, if one does."""
        better = [
            t
            for t in self.trials
            if t.verdict and len(t.fixes) == 1 and t.worst_rel_error < 0.5 * self.worst_rel_error
        ]
        return min(better, key=lambda t: t.worst_rel_error, default=None)

    def to_dict(self) -> dict[str, Any]:
        fields = records.to_dict(
            self,
            floor_ratio=lambda ratios: {
                g: {m: encode_float(v) for m, v in r.items()} for g, r in ratios.items()
            },
        )
        return {
            "schema_version": SCHEMA_VERSION,
            **records.insert_after(
                records.insert_after(fields, "verdict", passed=self.passed),
                "floor_dtype",
                floor_kind=self.floor_kind,
            ),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareResult:
        result = records.from_dict(
            cls,
            data,
            candidate=Side.from_dict,
            reference=Side.from_dict,
            groups=group_results,
            floor=group_results,
            floor_fp32=group_results,
            floor_ratio=lambda ratios: {
                g: {m: decode_float(v) for m, v in r.items()} for g, r in ratios.items()
            },
            thresholds=lambda ts: [records.from_dict(Threshold, t) for t in ts],
            verdict=Verdict.from_dict,
            localization=lambda loc: Localization.from_dict(loc) if loc else None,
            trials=lambda ts: [FixTrial.from_dict(t) for t in ts],
        )
        if "floor_fp32" not in data:  # older files hold only the fp32 floor, as `floor`
            result.floor_fp32 = dict(result.floor)
        return result


def run_check(
    base: Encoder,
    candidate: Encoder,
    check: CheckPlan,
    *,
    localize: bool = False,
    trials: Sequence[tuple[str, ...]] = (),
    make_candidate: MakeCandidate | None = None,
    fixes: Sequence[str] = (),
    batch_size: int = 4,
    progress: Progress = no_progress,
    notes: Sequence[str] = (),
) -> CompareResult:
    """Compare `candidate` (with `fixes` applied) on an assembled check: run both sides, measure
    the floors of its dtype, judge, localise where asked, and try each of `trials` with a fresh
    candidate from `make_candidate(fixes)`. `base` is the model on the CPU in fp32: it gives
    the floors and, for a file reference, the in-process model that localisation runs."""
    if trials and make_candidate is None:
        raise VitportError("trying fixes needs a way to build a fresh candidate")
    run = run_sides(
        candidate,
        check.reference,
        check.inputs,
        fixes=fixes,
        batch_size=batch_size,
        progress=progress,
    )
    fp32 = run.reference_features if _is_cpu_fp32(check.reference) else None
    floors = measure_floors(
        base, check.inputs, candidate.dtype, fp32=fp32, batch_size=batch_size, progress=progress
    )
    judged = judge_run(run, floors, check.thresholds)
    located = None
    if localize:
        located = localize_run(
            base, candidate, check.reference, check.inputs, check.part_reference, progress
        )
    setting = TrialSetting(run.reference_features, check.inputs, check.thresholds, batch_size)
    tried = try_fixes(make_candidate, trials, setting, progress) if trials else []
    return compare_result(base.spec, run, floors, judged, check.thresholds, located, tried, notes)


def compare_result(
    spec: str,
    run: Run,
    floors: Floors,
    judged: Judged,
    thresholds: Sequence[Threshold],
    located: Located | None = None,
    trials: Sequence[FixTrial] = (),
    notes: Sequence[str] = (),
) -> CompareResult:
    """The steps' records gathered into one result."""
    return CompareResult(
        spec=spec,
        candidate=run.candidate,
        reference=run.reference,
        inputs=list(run.names),
        groups=judged.groups,
        floor=floors.floor,
        floor_ratio=judged.floor_ratio,
        thresholds=list(thresholds),
        verdict=judged.verdict,
        floor_fp32=floors.fp32,
        floor_dtype=floors.dtype,
        localization=located.localization if located else None,
        localization_reference=located.reference if located else "",
        trials=list(trials),
        notes=[*notes, *([located.note] if located and located.note else [])],
        patch_error_map=judged.patch_error_map,
    )


def compare(
    base: Encoder,
    candidate: Encoder,
    reference: Encoder | Features,
    images: Inputs,
    thresholds: Sequence[Threshold],
    *,
    localize_points: bool = False,
    trial_fixes: Sequence[tuple[str, ...]] = (),
    make_candidate: MakeCandidate | None = None,
    batch_size: int = 4,
    fixes: Sequence[str] = (),
    progress: Progress = no_progress,
    notes: Sequence[str] = (),
    part_reference: Encoder | None = None,
) -> CompareResult:
    """Compare `candidate` with `reference` on `images`, with the noise floor of its dtype.

    The floor is what the candidate's dtype alone costs (see :func:`floor_kind`); the fp32 vs
    fp64 floor is kept beside it as `floor_fp32`.
    `base` is the model on the CPU in fp32: it gives the floors and, for golden references,
    the in-process reference for localisation. `make_candidate(fixes)` builds a fresh candidate
    with those fixes applied, for `trial_fixes`. The same as :func:`run_check` on a check of
    `reference`, `images` and `thresholds` (a golden file checks the images and orders them).
    """
    inputs = (
        reference_inputs(reference, base, images) if isinstance(reference, Features) else images
    )
    check = CheckPlan(reference, inputs, tuple(thresholds), part_reference)
    return run_check(
        base,
        candidate,
        check,
        localize=localize_points,
        trials=trial_fixes,
        make_candidate=make_candidate,
        fixes=fixes,
        batch_size=batch_size,
        progress=progress,
        notes=notes,
    )


def candidate_factory(
    base: Encoder, device: Device, setup: Setup, fault: str | None = None
) -> Callable[[Sequence[str]], tuple[Encoder, str]]:
    """make(fixes) -> a fresh copy of `base` prepared on the candidate device as `setup` asks
    (see vitport.runtimes.prepare), with the planted fault (if any) and `fixes` in place of the
    setup's own, and one line saying what was changed. The runtime is checked now, before
    anything is built."""
    from vitport.runtimes import check, prepare

    check(setup, device.type)

    def make(fixes: Sequence[str]) -> tuple[Encoder, str]:
        prepared = prepare(base, replace(setup, fixes=tuple(fixes)), device, fault=fault)
        return prepared.encoder, "; ".join(prepared.changes)

    return make


def _is_cpu_fp32(reference: Encoder | Features) -> bool:
    return (
        isinstance(reference, Encoder)
        and reference.device.type == "cpu"
        and reference.dtype == torch.float32
    )
