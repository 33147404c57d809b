"""End-to-end throughput: image files to features, with DataLoader workers, and where time goes.

Decoding (``vitport.inputs.read_image``) and preprocessing (the encoder's own processor) run
in ``torch.utils.data`` workers; the main process waits for batches, copies them to the
device and runs the model. Each stage is timed so the report can say what limits throughput.

Workers use the platform's default start method. On Linux before Python 3.14 that is
``fork``, so the encoder's preprocess callable (a closure around the model's image processor)
needs no pickling. Under ``spawn`` (macOS, Windows) or ``forkserver`` (Linux, Python 3.14+)
the closure cannot be pickled; when workers fail to start the run falls back to
``workers=0`` and says so in :attr:`E2EResult.notes`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitport import records
from vitport.encoder import Encoder
from vitport.errors import ImageError, VitportError
from vitport.inputs import stream
from vitport.inputs.stream import Batch, ImageInputs, Workers

__all__ = ["E2EResult", "StageTimes", "run_e2e"]

STAGES = ("decode", "preprocess", "data_wait", "host_to_device", "model")


@dataclass(frozen=True)
class StageTimes:
    """Seconds per stage, summed over all counted images or batches.

    ``decode`` and ``preprocess`` are summed over images inside the workers, so with several
    workers they can exceed the wall time. ``data_wait``, ``host_to_device`` and ``model`` are
    spent in the main process, one after another, and fit inside the wall time.
    """

    decode: float = 0.0
    preprocess: float = 0.0
    data_wait: float = 0.0
    host_to_device: float = 0.0
    model: float = 0.0

    def __add__(self, other: StageTimes) -> StageTimes:
        return StageTimes(*(getattr(self, s) + getattr(other, s) for s in STAGES))


@dataclass
class E2EResult:
    """One end-to-end run: counted images, the wall time, and the time in each stage."""

    images: int
    skipped: list[tuple[str, str]]  # (name, reason) of files that could not be used
    batch_size: int
    workers: int  # the number of workers that actually ran
    wall_seconds: float
    stages: StageTimes
    workers_requested: int = 0
    device: str = ""
    checksum: float = 0.0  # sum of |pooled outputs|: proof the model ran, not a result
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def breakdown(self) -> dict[str, float]:
        """Milliseconds per image for each stage, and ``wall`` (1000 * wall / images)."""
        n = max(self.images, 1)
        out = {s: 1000.0 * getattr(self.stages, s) / n for s in STAGES}
        out["wall"] = 1000.0 * self.wall_seconds / n
        return out

    def fractions(self) -> dict[str, float]:
        """Share of the wall time spent waiting for data, copying, in the model, and elsewhere."""
        wall = self.wall_seconds
        if wall <= 0:
            return {"data_wait": 0.0, "host_to_device": 0.0, "model": 0.0, "other": 0.0}
        main = {s: getattr(self.stages, s) / wall for s in ("data_wait", "host_to_device", "model")}
        main["other"] = max(0.0, 1.0 - sum(main.values()))
        return main

    def bottleneck(self) -> str:
        """One line naming what limits throughput, and what to try."""
        if self.images == 0 or self.wall_seconds <= 0:
            return "nothing timed: no images were encoded"
        share = self.fractions()
        top = max(share, key=lambda k: share[k])
        pct = {k: round(100 * v) for k, v in share.items()}
        if top == "data_wait":
            stage = "decoding" if self.stages.decode > self.stages.preprocess else "preprocessing"
            hint = "add --workers" if self.workers == 0 else f"add --workers (now {self.workers})"
            return (
                f"data loading: the model waits {pct['data_wait']}% of the wall time for images "
                f"(mostly {stage}); {hint}"
            )
        if top == "model":
            return f"model-bound: {pct['model']}% of wall time in the model"
        if top == "host_to_device":
            return (
                f"host-to-device copy: {pct['host_to_device']}% of wall time copying pixels "
                "to the device; try a larger --batch-size or a 16-bit --dtype"
            )
        return (
            f"main-process overhead: {pct['other']}% of wall time outside data wait, copy and "
            f"model (model {pct['model']}%, data wait {pct['data_wait']}%)"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; derived values (throughput, breakdown, bottleneck) included for reports."""
        fields = records.to_dict(self)
        requested = fields.pop("workers_requested")  # written beside workers
        return {
            **records.insert_after(fields, "workers", workers_requested=requested),
            "images_per_second": self.images_per_second,
            "breakdown_ms_per_image": self.breakdown(),
            "bottleneck": self.bottleneck(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> E2EResult:
        """Inverse of :meth:`to_dict`; derived values are recomputed, not read. Older files
        without ``workers_requested`` requested the workers that ran."""
        return records.from_dict(
            cls,
            {"workers_requested": data["workers"], **data},
            skipped=lambda items: [(str(name), str(reason)) for name, reason in items],
            stages=lambda stages: records.from_dict(StageTimes, stages),
            notes=lambda notes: [str(n) for n in notes],
        )


# ------------------------------------------------------------------------------- the run


@dataclass
class _Tally:
    stages: StageTimes = field(default_factory=StageTimes)
    images: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def _run(
    encoder: Encoder,
    dataset: ImageInputs,
    batch_size: int,
    pool: Workers,
    repeats: int,
    warmup_batches: int,
) -> tuple[_Tally, float, float]:
    """Warm up, then time ``repeats`` passes; returns the tally, wall seconds and checksum."""
    device = encoder.device
    pin = device.pin_memory
    target = device.torch_device
    checksum = torch.zeros((), dtype=torch.float64, device=target)

    def step(batch: Batch) -> tuple[float, float]:
        nonlocal checksum
        with device.timer() as copy:
            pixels = batch.pixels.to(target, non_blocking=pin).to(encoder.dtype)
        with device.timer() as model:
            feats = encoder.encode(pixels)
            out = feats.pooled if feats.pooled is not None else feats.patches
            checksum = checksum + out.to(torch.float64).abs().sum()
        return copy.seconds, model.seconds

    with torch.inference_mode():
        if warmup_batches > 0:
            done = 0
            for batch, _ in stream.stream(dataset, batch_size, pool, pin):
                if batch.pixels.numel() == 0:
                    continue
                step(batch)
                done += 1
                if done >= warmup_batches:
                    break
        checksum = torch.zeros((), dtype=torch.float64, device=target)
        tally = _Tally()
        lost_before = pool.lost_seconds
        start = time.perf_counter()
        for _ in range(repeats):
            for batch, waited in stream.stream(dataset, batch_size, pool, pin):
                for failure in batch.failures:
                    tally.skipped.setdefault(failure.path, failure.message)
                copy_s = model_s = 0.0
                if batch.pixels.numel():
                    copy_s, model_s = step(batch)
                    tally.images += len(batch.indices)
                tally.stages = tally.stages + StageTimes(
                    batch.decode_s, batch.preprocess_s, waited, copy_s, model_s
                )
        total = float(checksum.item())
        device.synchronize()
        # workers that failed to start in the first timed pass cost no time of the run
        wall = time.perf_counter() - start - (pool.lost_seconds - lost_before)
    return tally, wall, total


def run_e2e(
    encoder: Encoder,
    paths: Sequence[Path],
    *,
    batch_size: int = 8,
    workers: int = 2,
    repeats: int = 1,
    warmup_batches: int = 1,
) -> E2EResult:
    """Time image files to features: decode, preprocess, copy to the device, run the model.

    The first ``warmup_batches`` batches of an extra, uncounted pass run first (kernel builds,
    worker start); then ``repeats`` full passes are timed. Unreadable files are skipped and
    listed in ``skipped``. If workers cannot start, the run uses ``workers=0`` and says so.
    Raises ImageError when no file could be used.
    """
    if batch_size < 1:
        raise VitportError(
            f"batch_size must be at least 1, not {batch_size}", params=("batch_size",)
        )
    if workers < 0:
        raise VitportError(f"workers must be 0 or more, not {workers}", params=("workers",))
    if repeats < 1:
        raise VitportError(f"repeats must be at least 1, not {repeats}", params=("repeats",))
    if warmup_batches < 0:
        raise VitportError(
            f"warmup_batches must be 0 or more, not {warmup_batches}", params=("warmup_batches",)
        )
    if not paths:
        raise ImageError("no images to benchmark; pass image files or a directory")
    dataset = ImageInputs(stream.file_inputs(paths), encoder.preprocess, encoder.dtype)
    pool = Workers(workers)
    tally, wall, checksum = _run(encoder, dataset, batch_size, pool, repeats, warmup_batches)
    if tally.images == 0:
        first = next(iter(tally.skipped.items()), None)
        why = f" (first: {first[0]}: {first[1]})" if first else ""
        what = (
            "the one file could not" if len(paths) == 1 else f"none of the {len(paths)} files could"
        )
        raise ImageError(f"{what} be used{why}")
    return E2EResult(
        images=tally.images,
        skipped=list(tally.skipped.items()),
        batch_size=batch_size,
        workers=pool.used,
        wall_seconds=wall,
        stages=tally.stages,
        workers_requested=workers,
        device=str(encoder.device),
        checksum=checksum,
        notes=pool.notes,
    )
