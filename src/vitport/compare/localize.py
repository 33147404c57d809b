"""Where does the error come from? Accumulated and teacher-forced local error at every point.

One reference forward with hooks at the embeddings, every block and every block part. At each
point the candidate's twin module is run on the *reference's* input (teacher forcing), so its
local error is not blurred by what earlier blocks did. One candidate forward then gives the
accumulated error at the same points. Only running sums are kept, never dumps.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
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


# --- against a golden file from another machine --------------------------------------------------

BLOCKS = "blocks/"  # the prefix of block states inside a golden file
EMBEDDINGS = "embeddings"


def block_points(encoder: Encoder) -> list[str]:
    """The hook points a golden file stores: the embeddings' output, then every block's."""
    names = {id(m): n for n, m in encoder.module.named_modules()}
    return [EMBEDDINGS, *(names[id(b)] for b in encoder.blocks)]


def _hooked_forward(encoder: Encoder, pixels: torch.Tensor, on_input, on_output) -> None:
    """One forward with `on_input(index, args, kwargs)` before and `on_output(index, output)`
    after every block."""
    handles = []
    for index, block in enumerate(encoder.blocks):
        handles.append(
            block.register_forward_pre_hook(
                lambda _m, args, kwargs, i=index: on_input(i, args, kwargs), with_kwargs=True
            )
        )
        handles.append(block.register_forward_hook(
            lambda _m, _args, output, i=index: on_output(i, output)))  # fmt: skip
    try:
        with torch.inference_mode():
            encoder.forward_fn(
                encoder.module, pixels.to(encoder.device.torch_device, encoder.dtype)
            )
    finally:
        for handle in handles:
            handle.remove()


def record_block_states(
    encoder: Encoder, pixel_batches: Iterable[torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every point's hidden states for every image, on the CPU: what `infer --with-blocks`
    stores, in the run's dtype unless `dtype` says otherwise."""
    points = block_points(encoder)
    kept: dict[str, list[torch.Tensor]] = {p: [] for p in points}
    keep_dtype = dtype or encoder.dtype

    def on_input(index: int, args: tuple, kwargs: dict) -> None:
        if index == 0:
            kept[EMBEDDINGS].append(first_tensor((args, kwargs)).detach().to("cpu", keep_dtype))

    def on_output(index: int, output: Any) -> None:
        kept[points[index + 1]].append(first_tensor(output).detach().to("cpu", keep_dtype))

    for pixels in pixel_batches:
        _hooked_forward(encoder, pixels, on_input, on_output)
    return {BLOCKS + p: torch.cat(v) for p, v in kept.items()}


@dataclass(frozen=True)
class GoldenBlocks:
    """The block states inside a golden file, read a slice at a time, never all at once."""

    path: str
    points: list[str]
    images: list[str]
    dtype: str

    @classmethod
    def open(cls, path: str | Any) -> GoldenBlocks | None:
        """None when the file holds no block states."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if "block_points" not in header:
            return None
        return cls(str(path), json.loads(header["block_points"]),
                   json.loads(header["block_images"]), header.get("block_dtype", ""))  # fmt: skip

    def read(self, point: str, start: int, stop: int) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            return f.get_slice(BLOCKS + point)[start:stop]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same call with its hidden-states tensor (the first tensor argument) replaced."""
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return args, {**kwargs, key: hidden}
    return (hidden, *args), kwargs


def localize_golden(
    candidate: Encoder,
    golden: GoldenBlocks,
    pixel_batches: Iterable[torch.Tensor],
    part_reference: Encoder | None = None,
) -> Localization:
    """Accumulated error: the candidate's own run against the golden states. Local error of
    block i: the candidate's block i run on block i-1's golden output, against block i's golden
    output (teacher forcing across machines). Cost: one forward, plus each block once. Then the
    parts of the culprit block are teacher-forced against `part_reference` in this process."""
    points = block_points(candidate)
    accumulated = {p: ErrorSum() for p in points}
    local = {p: ErrorSum() for p in points}
    device, dtype = candidate.device.torch_device, candidate.dtype
    calls: dict[int, tuple[tuple, dict]] = {}  # each block's call in the last batch
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

        _hooked_forward(candidate, pixels, on_input, on_output)
        with torch.inference_mode():
            for index, block in enumerate(candidate.blocks):
                given = golden.read(points[index], start, stop).to(device, dtype)
                args, kwargs = _with_hidden(*calls[index], given)
                forced = first_tensor(block(*args, **kwargs))
                local[points[index + 1]].add(golden.read(points[index + 1], start, stop), forced)
        last, start = (start, stop), stop
    errors = [
        PointError(
            name=name,
            block=None if name == EMBEDDINGS else index - 1,
            kind="embeddings" if name == EMBEDDINGS else "block",
            accumulated=accumulated[name].rel_error,
            local=local[name].rel_error,
            accumulated_max_abs=accumulated[name].max_abs,
            local_max_abs=local[name].max_abs,
        )
        for index, name in enumerate(points)
    ]
    found = judge_points(errors)
    culprit = next((p for p in errors if p.name == found.culprit and p.block is not None), None)
    if culprit is None or part_reference is None:
        return found
    from vitport.device import dtype_name

    parts = _parts_of(candidate, part_reference, golden, culprit.block, calls, points, last)
    worst = max(parts, key=lambda p: p.local, default=None)
    if worst is None or worst.local <= ABSOLUTE_FLOOR:
        return Localization(found.points + parts, found.culprit, found.reason, found.kind_medians)
    listing = ", ".join(f"{p.kind} {p.local:.3g}" for p in parts)
    reason = (
        f"{found.reason}; inside block {culprit.block}, against {part_reference.device} "
        f"{dtype_name(part_reference.dtype)} in this process, its {worst.kind} differs most "
        f"({listing})"
    )
    return Localization(found.points + parts, worst.name, reason, found.kind_medians)


def _parts_of(
    candidate: Encoder, reference: Encoder, golden: GoldenBlocks, block: int,
    calls: dict[int, tuple[tuple, dict]], points: list[str], rows: tuple[int, int],
) -> list[PointError]:  # fmt: skip
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
            forced = twins[name](*move(args, device, dtype), **move(kwargs, device, dtype))
            sums[name].add(first_tensor(output), first_tensor(forced))

        return run

    modules = dict(reference.module.named_modules())
    handles = [modules[n].register_forward_hook(hook(n), with_kwargs=True) for n in sums]
    try:
        with torch.inference_mode():
            given = golden.read(points[block], *rows).to(ref_device, ref_dtype)
            args, kwargs = _with_hidden(*move(calls[block], ref_device, ref_dtype), given)
            reference.blocks[block](*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return [PointError(name, block, kinds[name], 0.0, s.rel_error, 0.0, s.max_abs)
            for name, s in sums.items()]  # fmt: skip


def block_states_bytes(encoder: Encoder, images: int, dtype: torch.dtype) -> int:
    """The size of the block states of `images` images at the encoder's input size."""
    h, w = encoder.image_size
    gh, gw = encoder.layout.grid(h, w)
    tokens = encoder.layout.num_prefix + gh * gw
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return len(block_points(encoder)) * images * tokens * encoder.arch.hidden_size * itemsize


def golden_file_parts(
    encoder: Encoder, images: Sequence[Any], batch_size: int, fp32: bool, max_bytes: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The block states of `images` (LoadedImages) and the header naming them, for a golden file;
    refused, with the estimate, beyond `max_bytes`."""
    from vitport.device import dtype_name
    from vitport.errors import VitportError

    dtype = torch.float32 if fp32 else encoder.dtype
    size = block_states_bytes(encoder, len(images), dtype)
    if size > max_bytes:
        raise VitportError(
            f"block states for {len(images)} images would take {size / 1e9:.2f} GB, over "
            f"--max-bytes {max_bytes / 1e9:.2f} GB; lower --block-images or raise --max-bytes"
        )
    batches = (encoder.preprocess([im.image for im in images[i : i + batch_size]])
               for i in range(0, len(images), batch_size))  # fmt: skip
    states = record_block_states(encoder, batches, dtype)
    header = {
        "block_points": json.dumps(block_points(encoder)),
        "block_images": json.dumps([im.name for im in images]),
        "block_dtype": dtype_name(dtype),
    }
    return states, header
