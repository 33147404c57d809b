"""Where does the error come from? Accumulated and teacher-forced local error at every point.

One reference forward with hooks at the embeddings, every block and every block part. At each
point the candidate's twin module is run on the *reference's* input (teacher forcing), so its
local error is not blurred by what earlier blocks did. One candidate forward then gives the
accumulated error at the same points. Only running sums are kept, never dumps.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from vitport.encoder import Encoder

STANDOUT_FACTOR = 10.0  # a local error this many times its kind's median stands out
ABSOLUTE_FLOOR = 1e-6  # relative errors below this are arithmetic identity, never a culprit


@dataclass
class ErrorSum:
    """Running sums for mean|Δ| / mean|ref| and the largest |Δ| over many batches."""

    diff: float = 0.0
    ref: float = 0.0
    max_abs: float = 0.0

    def add(self, ref: torch.Tensor, out: torch.Tensor) -> None:
        ref64, out64 = ref.detach().double().cpu(), out.detach().double().cpu()
        delta = (out64 - ref64).abs()
        self.diff += float(delta.sum())
        self.ref += float(ref64.abs().sum())
        self.max_abs = max(self.max_abs, float(delta.max()) if delta.numel() else 0.0)

    @property
    def rel_error(self) -> float:
        if self.ref == 0:
            return 0.0 if self.diff == 0 else float("inf")
        return self.diff / self.ref


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
        return {
            "points": [asdict(p) for p in self.points],
            "culprit": self.culprit,
            "reason": self.reason,
            "kind_medians": self.kind_medians,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Localization:
        return cls(
            points=[PointError(**p) for p in data["points"]],
            culprit=data["culprit"],
            reason=data["reason"],
            kind_medians=data.get("kind_medians", {}),
        )


def first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def move(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Tensors to the candidate's device; floating ones to its dtype; structure kept."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, tuple):
        return tuple(move(v, device, dtype) for v in value)
    if isinstance(value, list):
        return [move(v, device, dtype) for v in value]
    if isinstance(value, dict):
        return {k: move(v, device, dtype) for k, v in value.items()}
    return value


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
                forced = twins[name](*move(args, device, dtype), **move(kwargs, device, dtype))
                local[name].add(out, first_tensor(forced))

            return hook

        def embeddings_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = first_tensor((args, kwargs))
            if hidden is not None and "embeddings" not in cache:
                cache["embeddings"] = hidden.detach()

        def candidate_hook(name: str):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
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

        handles = [
            module.register_forward_hook(reference_hook(name), with_kwargs=True)
            for name, _, _, module in points
        ]
        handles.append(
            reference.blocks[0].register_forward_pre_hook(embeddings_hook, with_kwargs=True)
        )
        try:
            with torch.inference_mode():
                reference.forward_fn(reference.module, pixels.to(reference.device.torch_device,
                                                                  reference.dtype))  # fmt: skip
        finally:
            for handle in handles:
                handle.remove()
        handles = [twins[name].register_forward_hook(candidate_hook(name)) for name, *_ in points]
        handles.append(
            candidate.blocks[0].register_forward_pre_hook(candidate_embeddings, with_kwargs=True)
        )
        try:
            with torch.inference_mode():
                candidate.forward_fn(candidate.module, pixels.to(device, dtype))
        finally:
            for handle in handles:
                handle.remove()

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
                    f"{where}: local error of its {p.kind} is {p.local:.3g}, against "
                    f"{typical:.3g} typical for the other {p.kind} points; "
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
                f"the embeddings already differ by {embeddings.local:.3g}, against "
                f"{typical_block:.3g} typical for a block"
            ),
            kind_medians=medians,
        )
    if all(p.local == 0 and p.accumulated == 0 for p in points):
        return Localization(points, None, "candidate and reference agree exactly at every point",
                            kind_medians=medians)  # fmt: skip
    worst = max((k for k in medians if k != "embeddings"), key=lambda k: medians[k], default=None)
    reason = "no single point stands out: the error is spread evenly over the blocks"
    if worst is not None and medians[worst] > ABSOLUTE_FLOOR:
        reason += f" (largest typical local error: {worst}, {medians[worst]:.3g})"
    return Localization(points, culprit=None, reason=reason, kind_medians=medians)
