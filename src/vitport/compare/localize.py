"""Where does the error come from? Accumulated and teacher-forced local error at every point.

One reference forward with hooks at the embeddings, every block and every block part. At each
point the candidate's twin module is run on the *reference's* input (teacher forcing), so its
local error is not blurred by what earlier blocks did. One candidate forward then gives the
accumulated error at the same points. Only running sums are kept, never dumps.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vitport import records
from vitport.compare.check import golden_blocks
from vitport.compare.sides import Inputs, Progress, no_progress, pixel_batches
from vitport.device import dtype_name
from vitport.encoder import Encoder, Features
from vitport.format import count, pct
from vitport.golden import EMBEDDINGS, GoldenBlocks, block_points
from vitport.hooks import (
    ErrorSum,
    first_tensor,
    hooked,
    hooked_forward,
    move,
    teacher_force,
    with_hidden,
)

if TYPE_CHECKING:
    from vitport.msprobe import DumpBlocks

from vitport.inputs import PixelInputs

STANDOUT_FACTOR = 10.0  # a local error this many times its kind's median stands out
ABSOLUTE_FLOOR = 1e-6  # relative errors below this are arithmetic identity, never a culprit


@dataclass(frozen=True)
class PointError:
    """Error at one hook point: its name, block index, kind, accumulated and local error."""

    name: str
    block: int | None
    kind: str  # "embeddings", "block", "final_norm", or the part's attribute name
    accumulated: float
    local: float
    accumulated_max_abs: float
    local_max_abs: float


@dataclass
class Localization:
    points: list[PointError]
    culprit: str | None
    reason: str
    kind_medians: dict[str, float] = field(default_factory=dict)

    def blocks(self) -> list[PointError]:
        return [p for p in self.points if p.kind in ("embeddings", "block", "final_norm")]

    def to_dict(self) -> dict[str, Any]:
        return records.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Localization:
        return records.from_dict(
            cls, data, points=lambda ps: [records.from_dict(PointError, p) for p in ps]
        )


def hook_points(encoder: Encoder) -> list[tuple[str, int | None, str, nn.Module]]:
    """(point name, block index, kind, module) for every block, block part and the final norm."""
    names = {id(m): n for n, m in encoder.module.named_modules()}
    points = []
    for index, block in enumerate(encoder.blocks):
        for part, module in encoder.block_parts(index).items():
            points.append((names[id(module)], index, part, module))
        points.append((names[id(block)], index, "block", block))
    if encoder.final_norm is not None:
        points.append((names[id(encoder.final_norm)], None, "final_norm", encoder.final_norm))
    return points


def localize(
    candidate: Encoder, reference: Encoder, pixel_batches: Iterable[torch.Tensor]
) -> Localization:
    """Accumulated and local error at every point, and the first point whose local error stands out."""
    twins = dict(candidate.module.named_modules())
    points = hook_points(reference)
    accumulated = {name: ErrorSum() for name, *_ in points}
    local = {name: ErrorSum() for name, *_ in points}
    accumulated["embeddings"], local["embeddings"] = ErrorSum(), ErrorSum()
    order: list[str] = []
    device, dtype = candidate.device.torch_device, candidate.dtype

    cache: dict[str, torch.Tensor] = {}
    for pixels in pixel_batches:
        cache.clear()

        def reference_hook(name: str):
            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                out = first_tensor(output)
                if out is None:
                    return
                if name not in order:
                    order.append(name)
                cache[name] = out.detach()
                teacher_force(
                    twins[name],
                    move(args, device, dtype),
                    move(kwargs, device, dtype),
                    out,
                    local[name],
                )

            return hook

        def embeddings_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = first_tensor((args, kwargs))
            if hidden is not None and "embeddings" not in cache:
                cache["embeddings"] = hidden.detach()

        def candidate_hook(name: str):
            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                out = first_tensor(output)
                if out is not None and name in cache:
                    accumulated[name].add(cache[name], out)

            return hook

        def candidate_embeddings(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = first_tensor((args, kwargs))
            if hidden is not None and "embeddings" in cache:
                reference_hidden = cache.pop("embeddings")  # the first block's input, once
                accumulated["embeddings"].add(reference_hidden, hidden)
                local["embeddings"].add(
                    reference_hidden, hidden
                )  # same pixels: local = accumulated

        hooks = [(module, reference_hook(name)) for name, _, _, module in points]
        with hooked(hooks, [(reference.blocks[0], embeddings_hook)]), torch.inference_mode():
            reference.forward_fn(
                reference.module, pixels.to(reference.device.torch_device, reference.dtype)
            )
        hooks = [(twins[name], candidate_hook(name)) for name, *_ in points]
        with hooked(hooks, [(candidate.blocks[0], candidate_embeddings)]), torch.inference_mode():
            candidate.forward_fn(candidate.module, pixels.to(device, dtype))

    meta = {name: (block, kind) for name, block, kind, _ in points}
    meta["embeddings"] = (None, "embeddings")
    ordered = ["embeddings"] + [n for n in order if n in meta]
    errors = [
        PointError(
            name=name,
            block=meta[name][0],
            kind=meta[name][1],
            accumulated=accumulated[name].rel_error,
            local=local[name].rel_error,
            accumulated_max_abs=accumulated[name].max_abs,
            local_max_abs=local[name].max_abs,
        )
        for name in ordered
    ]
    return judge_points(errors)


def judge_points(points: list[PointError]) -> Localization:
    """Name the first point whose local error stands out from the others of its kind."""
    by_kind: dict[str, list[float]] = {}
    for p in points:
        by_kind.setdefault(p.kind, []).append(p.local)
    medians = {kind: statistics.median(values) for kind, values in by_kind.items()}
    for p in points:
        others = list(by_kind[p.kind])
        others.remove(p.local)
        if p.kind == "embeddings" or not others:
            continue
        typical = statistics.median(others)  # leave-one-out, so a culprit does not hide itself
        if p.local > max(STANDOUT_FACTOR * typical, ABSOLUTE_FLOOR):
            where = f"block {p.block}" if p.block is not None else p.name
            return Localization(
                points,
                culprit=p.name,
                reason=(
                    f"{where}: local error of its {p.kind} is {pct(p.local)}, against "
                    f"{pct(typical)} typical for the other {p.kind} points; "
                    "no earlier point stands out"
                ),
                kind_medians=medians,
            )
    embeddings = next((p for p in points if p.kind == "embeddings"), None)
    typical_block = medians.get("block", 0.0)
    if embeddings is not None and embeddings.local > max(
        STANDOUT_FACTOR * typical_block, ABSOLUTE_FLOOR
    ):
        return Localization(
            points,
            culprit="embeddings",
            reason=(
                f"the embeddings already differ by {pct(embeddings.local)}, against "
                f"{pct(typical_block)} typical for a block"
            ),
            kind_medians=medians,
        )
    if all(p.local == 0 and p.accumulated == 0 for p in points):
        return Localization(
            points,
            None,
            "candidate and reference agree exactly at every point",
            kind_medians=medians,
        )
    worst = max((k for k in medians if k != "embeddings"), key=lambda k: medians[k], default=None)
    reason = "no single point stands out: the error is spread evenly over the blocks"
    if worst is not None and medians[worst] > ABSOLUTE_FLOOR:
        reason += f" (largest typical local error: {worst}, {pct(medians[worst])})"
    return Localization(points, culprit=None, reason=reason, kind_medians=medians)


# --- against a golden file from another machine --------------------------------------------------


def localize_golden(
    candidate: Encoder,
    golden: GoldenBlocks | DumpBlocks,
    pixel_batches: Iterable[torch.Tensor],
    part_reference: Encoder | None = None,
) -> Localization:
    """Accumulated error: the candidate's own run against the golden states. Local error of
    block i: the candidate's block i run on block i-1's golden output, against block i's golden
    output (teacher forcing across machines). Cost: one forward, plus each block once. Where the
    states hold every block's parts (an msprobe dump), each part is teacher-forced on its own
    recorded input as well; else the parts of the culprit block are teacher-forced against
    `part_reference` in this process."""
    points = block_points(candidate)
    parts = {
        name: (index, kind) for index, found in golden.parts.items() for kind, name in found.items()
    }
    accumulated = {p: ErrorSum() for p in [*points, *parts]}
    local = {p: ErrorSum() for p in [*points, *parts]}
    device, dtype = candidate.device.torch_device, candidate.dtype
    twins = dict(candidate.module.named_modules())
    calls: dict[int, tuple[tuple, dict]] = {}  # each block's call in the last batch
    part_calls: dict[str, tuple[tuple, dict]] = {}
    start, last = 0, (0, 0)
    for pixels in pixel_batches:
        stop = start + len(pixels)

        def on_input(index: int, args: tuple, kwargs: dict, start=start, stop=stop) -> None:
            calls[index] = (args, kwargs)
            if index == 0:
                hidden = first_tensor((args, kwargs))
                golden_in = golden.read(EMBEDDINGS, start, stop)
                accumulated[EMBEDDINGS].add(golden_in, hidden)
                local[EMBEDDINGS].add(golden_in, hidden)  # same pixels: local = accumulated

        def on_output(index: int, output: Any, start=start, stop=stop) -> None:
            point = points[index + 1]
            accumulated[point].add(golden.read(point, start, stop), first_tensor(output))

        def part_input(name: str):
            def hook(_m: nn.Module, call_args: tuple, call_kwargs: dict) -> None:
                part_calls[name] = (call_args, call_kwargs)

            return hook

        def part_output(name: str, start=start, stop=stop):
            def hook(_m: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> None:
                expected = golden.rows(name, "output", start, stop)
                accumulated[name].add(expected, first_tensor(output))

            return hook

        with hooked(
            [(twins[n], part_output(n)) for n in parts], [(twins[n], part_input(n)) for n in parts]
        ):
            hooked_forward(candidate, pixels, on_input, on_output)
        with torch.inference_mode():
            for index, block in enumerate(candidate.blocks):
                given = golden.read(points[index], start, stop).to(device, dtype)
                args, kwargs = with_hidden(*calls[index], given)
                expected = golden.read(points[index + 1], start, stop)
                teacher_force(block, args, kwargs, expected, local[points[index + 1]])
            for name in parts:
                given = golden.rows(name, "input", start, stop).to(device, dtype)
                args, kwargs = with_hidden(*part_calls[name], given)
                expected = golden.rows(name, "output", start, stop)
                teacher_force(twins[name], args, kwargs, expected, local[name])
        last, start = (start, stop), stop

    def point(name: str, block: int | None, kind: str) -> PointError:
        return PointError(
            name,
            block,
            kind,
            accumulated[name].rel_error,
            local[name].rel_error,
            accumulated[name].max_abs,
            local[name].max_abs,
        )

    errors = [point(EMBEDDINGS, None, "embeddings")]
    for index, name in enumerate(points[1:]):
        errors += [point(n, *parts[n]) for n in parts if parts[n][0] == index]
        errors.append(point(name, index, "block"))
    found = judge_points(errors)
    if parts:
        return found
    culprit = next((p for p in errors if p.name == found.culprit and p.block is not None), None)
    if culprit is None or part_reference is None:
        return found
    from vitport.device import dtype_name

    parts_found = _parts_of(candidate, part_reference, golden, culprit.block, calls, points, last)
    worst = max(parts_found, key=lambda p: p.local, default=None)
    if worst is None or worst.local <= ABSOLUTE_FLOOR:
        return Localization(
            found.points + parts_found, found.culprit, found.reason, found.kind_medians
        )
    listing = ", ".join(f"{p.kind} {pct(p.local)}" for p in parts_found)
    reason = (
        f"{found.reason}; inside block {culprit.block}, against {part_reference.device} "
        f"{dtype_name(part_reference.dtype)} in this process, its {worst.kind} differs most "
        f"({listing})"
    )
    return Localization(found.points + parts_found, worst.name, reason, found.kind_medians)


def _parts_of(
    candidate: Encoder,
    reference: Encoder,
    golden: GoldenBlocks,
    block: int,
    calls: dict[int, tuple[tuple, dict]],
    points: list[str],
    rows: tuple[int, int],
) -> list[PointError]:
    """The culprit block's parts on the last batch: the reference block runs on the golden
    input, and each of the candidate's parts runs on what the reference's twin part received."""
    names = {id(m): n for n, m in reference.module.named_modules()}
    twins = dict(candidate.module.named_modules())
    sums = {
        name: ErrorSum() for name in (names[id(m)] for m in reference.block_parts(block).values())
    }
    kinds = {names[id(m)]: kind for kind, m in reference.block_parts(block).items()}
    device, dtype = candidate.device.torch_device, candidate.dtype
    ref_device, ref_dtype = reference.device.torch_device, reference.dtype

    def hook(name: str):
        def run(_m: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            teacher_force(
                twins[name],
                move(args, device, dtype),
                move(kwargs, device, dtype),
                first_tensor(output),
                sums[name],
            )

        return run

    modules = dict(reference.module.named_modules())
    with hooked([(modules[n], hook(n)) for n in sums]), torch.inference_mode():
        given = golden.read(points[block], *rows).to(ref_device, ref_dtype)
        args, kwargs = with_hidden(*move(calls[block], ref_device, ref_dtype), given)
        reference.blocks[block](*args, **kwargs)
    return [
        PointError(name, block, kinds[name], 0.0, s.rel_error, 0.0, s.max_abs)
        for name, s in sums.items()
    ]


# --- the localisation step of a comparison -------------------------------------------------------


@dataclass(frozen=True)
class Located:
    """A comparison's localisation: where the error comes from, and against what it was found."""

    localization: Localization
    reference: str  # what the local errors were measured against
    note: str = ""  # what the user should know about it, if anything


def localize_run(
    base: Encoder,
    candidate: Encoder,
    reference: Encoder | Features,
    inputs: Inputs,
    part_reference: Encoder | None = None,
    progress: Progress = no_progress,
) -> Located:
    """Localise the candidate's error: against a file's block states where it holds them (an
    msprobe dump, or a golden file written --with-blocks), else against a model run here (the
    in-process reference, or `base` for a file of final outputs only). `base` is the model on
    the CPU in fp32; `part_reference` the model the culprit's parts are compared with (`base`
    where None)."""
    blocks = golden_blocks(reference, candidate) if isinstance(reference, Features) else None
    if blocks is not None:
        parts = part_reference or base
        if isinstance(inputs, PixelInputs):
            progress("localising against the msprobe dump's block and part states")
            chosen: Inputs = inputs
            where = (
                f"the msprobe dump's block states ({blocks.dtype}, {count(len(inputs), 'input')})"
            )
        else:
            progress("localising against the golden file's block states")
            chosen = list(inputs[: len(blocks.images)])  # the file's first images, in its order
            where = (
                f"the golden file's block states ({blocks.dtype}, {count(len(chosen), 'image')})"
            )
        found = localize_golden(
            candidate, blocks, pixel_batches(base, chosen, 2), part_reference=parts
        )
        if blocks.parts:
            return Located(
                found, f"{where}, every block's parts teacher-forced on the dump's own part inputs"
            )
        return Located(
            found,
            f"{where}, the culprit block's parts against {parts.device} "
            f"{dtype_name(parts.dtype)} here",
        )
    progress("localising: teacher-forced error at every block")
    in_process = reference if isinstance(reference, Encoder) else base
    found = localize(candidate, in_process, pixel_batches(base, inputs, 2))
    where = f"the {in_process.device} {dtype_name(in_process.dtype)} model's inputs"
    if isinstance(reference, Encoder):
        return Located(found, where)
    return Located(
        found,
        where,
        "localisation ran against the CPU fp32 model in this process: the golden file "
        "holds final outputs only (write it with vitport infer --out FILE --with-blocks)",
    )
