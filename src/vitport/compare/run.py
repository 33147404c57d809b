"""`compare`: a candidate (device, dtype, fixes) against a reference run or a golden file."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vitport import records
from vitport.compare.localize import Localization, localize, localize_golden
from vitport.compare.metrics import (
    GroupResult,
    compare_groups,
    decode_float,
    encode_float,
    floor_ratios,
    worst_rel_error,
)
from vitport.compare.reference import golden_blocks, reference_inputs
from vitport.compare.verdict import Threshold, Verdict, judge_features
from vitport.device import Device, dtype_name, resolve_device
from vitport.encoder import Encoder, Features
from vitport.errors import VitportError
from vitport.fixes import process_settings_restored
from vitport.format import count
from vitport.golden import source_of
from vitport.inputs import LoadedImage, PixelInputs
from vitport.msprobe import is_dump_reference

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Side:
    """One side of a comparison, as data."""

    kind: str  # "run" or "golden"
    device: str
    dtype: str
    fixes: tuple[str, ...] = ()
    path: str = ""
    description: dict[str, str] = field(default_factory=dict)
    runtime: str = "torch"


@dataclass
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
            groups=lambda groups: _groups(groups) or None,
            verdict=lambda verdict: Verdict.from_dict(verdict) if verdict else None,
        )


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
        def side(d: dict[str, Any]) -> Side:
            return records.from_dict(Side, d)

        result = records.from_dict(
            cls,
            data,
            candidate=side,
            reference=side,
            groups=_groups,
            floor=_groups,
            floor_fp32=_groups,
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


def _groups(data: dict[str, Any]) -> dict[str, GroupResult]:
    return {k: GroupResult.from_dict(v) for k, v in data.items()}


Inputs = Sequence[LoadedImage] | PixelInputs
"""What a comparison runs on: images, or the pixel batches of a dump."""


def input_batches(
    encoder: Encoder, inputs: Inputs, batch_size: int
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(pixels, names) per forward: images preprocessed `batch_size` at a time, or a dump's own
    batches as they went in."""
    if isinstance(inputs, PixelInputs):
        start = 0
        for pixels in inputs.batches:
            yield pixels, inputs.names[start : start + len(pixels)]
            start += len(pixels)
        return
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        yield encoder.preprocess([im.image for im in chunk]), [im.name for im in chunk]


def features_of(encoder: Encoder, inputs: Inputs, batch_size: int) -> Features:
    parts = [
        encoder.encode(pixels, names).to("cpu", torch.float32)
        for pixels, names in input_batches(encoder, inputs, batch_size)
    ]
    return Features.concat(parts)


def pixel_batches(encoder: Encoder, inputs: Inputs, batch_size: int) -> Iterator[torch.Tensor]:
    for pixels, _ in input_batches(encoder, inputs, batch_size):
        yield pixels


def compare(
    base: Encoder,
    candidate: Encoder,
    reference: Encoder | Features,
    images: Inputs,
    thresholds: Sequence[Threshold],
    *,
    localize_points: bool = False,
    trial_fixes: Sequence[tuple[str, ...]] = (),
    make_candidate: Callable[[Sequence[str]], tuple[Encoder, str]] | None = None,
    batch_size: int = 4,
    fixes: Sequence[str] = (),
    progress: Callable[[str], None] = lambda _: None,
    notes: Sequence[str] = (),
    part_reference: Encoder | None = None,
) -> CompareResult:
    """Compare `candidate` with `reference` on `images`, with the noise floor of its dtype.

    The floor is what the candidate's dtype alone costs (see :func:`floor_kind`); the fp32 vs
    fp64 floor is kept beside it as `floor_fp32`.
    `base` is the model on the CPU in fp32: it gives the floors and, for golden references,
    the in-process reference for localisation. `make_candidate(fixes)` builds a fresh candidate
    with those fixes applied, for `trial_fixes`.
    """
    notes = list(notes)
    if isinstance(reference, Features):
        images = reference_inputs(reference, base, images)
        ref_feats = reference
        ref_side = Side(
            kind="msprobe" if is_dump_reference(reference) else "golden",
            device=str(reference.meta.get("device")),
            dtype=str(reference.meta.get("dtype")),
            path=source_of(reference),
            description=reference.meta.get("device_description", {}),
        )
    else:
        progress(f"reference on {reference.device} ({dtype_name(reference.dtype)})")
        ref_feats = features_of(reference, images, batch_size)
        ref_side = Side(
            "run",
            str(reference.device),
            dtype_name(reference.dtype),
            description=reference.device.describe(),
        )
    names = list(images.names) if isinstance(images, PixelInputs) else [im.name for im in images]
    progress(f"candidate on {candidate.device} ({dtype_name(candidate.dtype)})")
    out_feats = features_of(candidate, images, batch_size)
    judged = judge_features(ref_feats.groups(), out_feats.groups(), thresholds)
    groups = judged.groups

    progress("noise floor: fp32 vs fp64 on the CPU")
    cpu = resolve_device("cpu")
    fp32 = ref_feats if _is_cpu_fp32(reference) else features_of(base, images, batch_size)
    exact = base.to(cpu, torch.float64)
    fp64 = features_of(exact, images, batch_size)
    floor_fp32 = compare_groups(fp64.groups(), fp32.groups())
    floor_dtype = floor_dtype_of(candidate.dtype)
    floor = floor_fp32
    if floor_dtype != "fp32":
        progress(f"noise floor: weights and input rounded to {floor_dtype}, in fp64")
        rounded = rounded_features(exact, images, candidate.dtype, batch_size)
        floor = compare_groups(fp64.groups(), rounded.groups())

    result = CompareResult(
        spec=base.spec,
        candidate=Side(
            "run",
            str(candidate.device),
            dtype_name(candidate.dtype),
            tuple(fixes),
            description=candidate.device.describe(),
            runtime=candidate.runtime,
        ),
        reference=ref_side,
        inputs=names,
        groups=groups,
        floor=floor,
        floor_ratio=floor_ratios(groups, floor),
        thresholds=list(thresholds),
        verdict=judged.verdict,
        floor_fp32=floor_fp32,
        floor_dtype=floor_dtype,
        notes=notes,
        patch_error_map=patch_error_map(ref_feats, out_feats),
    )
    golden = localize_points and isinstance(reference, Features)
    blocks = golden_blocks(reference, candidate) if golden else None
    if blocks is not None:
        parts = part_reference or base
        if isinstance(images, PixelInputs):
            progress("localising against the msprobe dump's block and part states")
            chosen: Inputs = images
            where = (
                f"the msprobe dump's block states ({blocks.dtype}, {count(len(images), 'input')})"
            )
        else:
            progress("localising against the golden file's block states")
            chosen = list(images[: len(blocks.images)])  # the file's first images, in its order
            where = (
                f"the golden file's block states ({blocks.dtype}, {count(len(chosen), 'image')})"
            )
        result.localization = localize_golden(
            candidate, blocks, pixel_batches(base, chosen, 2), part_reference=parts
        )
        if blocks.parts:
            result.localization_reference = (
                f"{where}, every block's parts teacher-forced on the dump's"
            )
        else:
            result.localization_reference = (
                f"{where}, the culprit block's parts against {parts.device} "
                f"{dtype_name(parts.dtype)} here"
            )
    elif localize_points:
        progress("localising: teacher-forced error at every block")
        in_process = reference if isinstance(reference, Encoder) else base
        result.localization = localize(candidate, in_process, pixel_batches(base, images, 2))
        result.localization_reference = (
            f"the {in_process.device} {dtype_name(in_process.dtype)} model's inputs"
        )
        if isinstance(reference, Features):
            notes.append(
                "localisation ran against the CPU fp32 model in this process: the golden file "
                "holds final outputs only (write it with vitport infer --out FILE --with-blocks)"
            )
    if trial_fixes and make_candidate is None:
        raise VitportError("trying fixes needs a way to build a fresh candidate")

    def attempt(trial: tuple[str, ...]) -> FixTrial:
        progress(f"trying {'+'.join(trial)}")
        with process_settings_restored():  # a trial must not change the runs after it
            try:
                fixed, detail = make_candidate(trial)
            except VitportError as exc:  # the fix does not apply to this model
                return FixTrial(trial, None, None, str(exc))
            fixed_feats = features_of(fixed, images, batch_size)
        judged = judge_features(ref_feats.groups(), fixed_feats.groups(), thresholds)
        return FixTrial(trial, judged.groups, judged.verdict, detail)

    result.trials = [attempt(tuple(trial)) for trial in trial_fixes]
    applicable = tuple(t.fixes[0] for t in result.trials if t.groups is not None)
    if len(applicable) > 1:
        result.trials.append(attempt(applicable))
    return result


def candidate_factory(
    base: Encoder,
    device: Device,
    dtype: torch.dtype,
    fault: str | None = None,
    runtime: str = "torch",
) -> Callable[[Sequence[str]], tuple[Encoder, str]]:
    """make(fixes) -> a fresh copy of `base` on the candidate device, with the planted fault
    (if any) and the fixes applied, run by `runtime`, and one line saying what was changed."""
    from vitport.faults import inject
    from vitport.fixes import apply_fixes
    from vitport.runtimes import build, get_runtime

    exported = not get_runtime(runtime).torch_module  # built from the fp32 model, run at dtype

    def make(fixes: Sequence[str]) -> tuple[Encoder, str]:
        candidate = base.to(device, torch.float32 if exported else dtype)
        done = [inject(candidate, fault)] if fault else []
        done += [r.detail for r in apply_fixes(candidate, list(fixes))]
        if runtime != "torch":
            if fault:  # the export cache knows the weights and fixes, not a planted fault
                candidate.weights_sha256 += f"+{fault}"
            built = build(candidate, runtime, dtype)
            candidate = built.encoder
            done.append(f"run by {runtime} (built in {built.build_seconds:.1f} s)")
        return candidate, "; ".join(done)

    return make


def patch_error_map(ref: Features, out: Features, index: int = 0) -> list[list[float]]:
    """Relative error of each patch token of one input, laid out on the patch grid."""
    delta = (out.patches[index].double() - ref.patches[index].double()).abs().mean(-1)
    scale = ref.patches[index].double().abs().mean().clamp_min(1e-30)
    return (delta / scale).reshape(ref.grid).tolist()


def floor_dtype_of(dtype: torch.dtype) -> str:
    """The dtype whose cost the floor measures: fp16/bf16 as they are, fp32 for fp32 and fp64."""
    name = dtype_name(dtype)
    return name if name in ("fp16", "bf16") else "fp32"


def floor_kind(floor_dtype: str) -> str:
    """What the floor of a candidate in `floor_dtype` is, in one phrase."""
    if floor_dtype == "fp32":
        return "the same metric between fp32 and fp64 on the CPU (the arithmetic noise of fp32)"
    return (
        f"the same metric between fp64 on the weights and input rounded to {floor_dtype} and "
        f"fp64 on the exact ones, on the CPU (the error that {floor_dtype} alone costs)"
    )


def rounded_features(
    exact: Encoder, images: Inputs, dtype: torch.dtype, batch_size: int
) -> Features:
    """`exact` (an fp64 encoder) run in fp64 on its weights and the fp32 input both rounded to
    `dtype` and back: the error of the dtype's representation alone, without its arithmetic."""
    rounded = exact.to(copy=True)
    with torch.no_grad():
        for tensor in [*rounded.module.parameters(), *rounded.module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype).to(tensor.dtype))
    parts = []
    for pixels, names in input_batches(exact, images, batch_size):
        feats = rounded.encode(pixels.to(dtype).to(torch.float64), names)
        parts.append(feats.to("cpu", torch.float32))  # as infer returns the fp64 run's
    return Features.concat(parts)


def _is_cpu_fp32(reference: Encoder | Features) -> bool:
    return (
        isinstance(reference, Encoder)
        and reference.device.type == "cpu"
        and reference.dtype == torch.float32
    )


def describe_side(side: Side) -> str:
    text = f"{side.device} {side.dtype}"
    if side.runtime != "torch":
        text += f" on {side.runtime}"
    if side.fixes:
        text += f" + {', '.join(side.fixes)}"
    if side.kind == "golden":
        text += f" (golden file {side.path})"
    elif side.kind == "msprobe":
        text += f" (msprobe dump {side.path})"
    return text
