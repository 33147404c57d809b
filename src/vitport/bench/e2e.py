"""End-to-end throughput: image files to features, with DataLoader workers, and where time goes.

Decoding (``vitport.images.read_image``) and preprocessing (the encoder's own processor) run
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from vitport.encoder import Encoder
from vitport.errors import ImageError, VitportError
from vitport.images import read_image

__all__ = ["E2EResult", "StageTimes", "run_e2e"]

PINNED_DEVICE_TYPES = frozenset({"cuda", "npu"})
"""Device types whose host-to-device copies come from pinned memory."""

WORKER_TIMEOUT_S = 300.0
"""Seconds to wait for one batch from workers before giving up (a hung worker, not a slow one)."""

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
    checksum: float = 0.0  # sum of the pooled outputs: proof the model ran, not a result
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
        return {
            "images": self.images,
            "skipped": [list(item) for item in self.skipped],
            "batch_size": self.batch_size,
            "workers": self.workers,
            "workers_requested": self.workers_requested,
            "wall_seconds": self.wall_seconds,
            "stages": asdict(self.stages),
            "device": self.device,
            "checksum": self.checksum,
            "notes": list(self.notes),
            "images_per_second": self.images_per_second,
            "breakdown_ms_per_image": self.breakdown(),
            "bottleneck": self.bottleneck(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> E2EResult:
        """Inverse of :meth:`to_dict`; derived values are recomputed, not read."""
        return cls(
            images=int(data["images"]),
            skipped=[(str(name), str(reason)) for name, reason in data["skipped"]],
            batch_size=int(data["batch_size"]),
            workers=int(data["workers"]),
            wall_seconds=float(data["wall_seconds"]),
            stages=StageTimes(**{s: float(data["stages"][s]) for s in STAGES}),
            workers_requested=int(data.get("workers_requested", data["workers"])),
            device=str(data.get("device", "")),
            checksum=float(data.get("checksum", 0.0)),
            notes=[str(n) for n in data.get("notes", [])],
        )


# ------------------------------------------------------------------------------- data pipeline


class _Item(NamedTuple):
    """One image after the worker is done with it; ``pixels`` is None when it failed."""

    pixels: torch.Tensor | None
    name: str
    decode_s: float
    preprocess_s: float
    error: str | None


class _Batch(NamedTuple):
    """A collated batch; a NamedTuple so the DataLoader can pin its tensor."""

    pixels: torch.Tensor  # [B, 3, H, W], or empty when every item failed
    names: list[str]
    decode_s: float
    preprocess_s: float
    skipped: list[tuple[str, str]]


class _ImageFiles(Dataset):
    """Image files decoded and preprocessed one at a time; failures become marked items."""

    def __init__(
        self,
        paths: Sequence[Path],
        preprocess: Callable[[list[Any]], torch.Tensor],
        dtype: torch.dtype,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.preprocess = preprocess
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> _Item:
        path = self.paths[index]
        name = str(path)
        t0 = time.perf_counter()
        try:
            image = read_image(path)
        except ImageError as exc:
            return _Item(None, name, time.perf_counter() - t0, 0.0, _reason(exc, name))
        except Exception as exc:  # read_image should not raise these; never crash a benchmark
            reason = f"could not read: {_one_line(exc)}"
            return _Item(None, name, time.perf_counter() - t0, 0.0, reason)
        t1 = time.perf_counter()
        try:
            pixels = self.preprocess([image])[0].to(self.dtype)
        except Exception as exc:  # one odd image must not stop a benchmark
            reason = f"preprocessing failed: {_one_line(exc)}"
            return _Item(None, name, t1 - t0, time.perf_counter() - t1, reason)
        return _Item(pixels, name, t1 - t0, time.perf_counter() - t1, None)


def _reason(exc: ImageError, name: str) -> str:
    """read_image's message without the leading ``<path>: ``."""
    text = str(exc)
    prefix = f"{name}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _collate(items: list[_Item]) -> _Batch:
    """Stack the good items; failed ones are reported, an all-failed batch is empty."""
    good = [it for it in items if it.pixels is not None]
    pixels = torch.stack([it.pixels for it in good]) if good else torch.empty(0)
    return _Batch(
        pixels=pixels,
        names=[it.name for it in good],
        decode_s=sum(it.decode_s for it in items),
        preprocess_s=sum(it.preprocess_s for it in items),
        skipped=[(it.name, it.error or "unknown error") for it in items if it.pixels is None],
    )


def _loader(dataset: _ImageFiles, batch_size: int, workers: int, pin: bool) -> DataLoader:
    """The DataLoader; a module-level function so tests can change how workers start."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin,
        persistent_workers=False,
        timeout=WORKER_TIMEOUT_S if workers > 0 else 0,
    )


class _WorkersFailed(Exception):
    """Internal: DataLoader workers could not start; carries the one-line reason."""


# ------------------------------------------------------------------------------- the run


@dataclass
class _Tally:
    stages: StageTimes = field(default_factory=StageTimes)
    images: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def _timed_batches(loader: DataLoader, state: dict[str, bool]) -> Iterator[tuple[_Batch, float]]:
    """(batch, seconds waited for it); start-up failures of workers become _WorkersFailed."""

    def failed() -> bool:
        return loader.num_workers > 0 and not state.get("workers_ok", False)

    try:
        iterator = iter(loader)
    except Exception as exc:
        if failed():
            raise _WorkersFailed(_one_line(exc)) from exc
        raise
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            if failed():
                raise _WorkersFailed(_one_line(exc)) from exc
            raise
        waited = time.perf_counter() - t0
        state["workers_ok"] = True
        yield batch, waited


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _run(
    encoder: Encoder,
    dataset: _ImageFiles,
    batch_size: int,
    workers: int,
    repeats: int,
    warmup_batches: int,
) -> tuple[_Tally, float, float]:
    """Warm up, then time ``repeats`` passes; returns the tally, wall seconds and checksum."""
    device = encoder.device
    pin = device.type in PINNED_DEVICE_TYPES
    loader = _loader(dataset, batch_size, workers, pin)
    target = device.torch_device
    state: dict[str, bool] = {}
    checksum = torch.zeros((), dtype=torch.float64, device=target)

    def step(batch: _Batch) -> tuple[float, float]:
        nonlocal checksum
        with device.timer() as copy:
            pixels = batch.pixels.to(target, non_blocking=pin).to(encoder.dtype)
        with device.timer() as model:
            feats = encoder.encode(pixels)
            out = feats.pooled if feats.pooled is not None else feats.patches
            checksum = checksum + out.to(torch.float64).sum()
        return copy.seconds, model.seconds

    with torch.inference_mode():
        if warmup_batches > 0:
            done = 0
            for batch, _ in _timed_batches(loader, state):
                if batch.pixels.numel() == 0:
                    continue
                step(batch)
                done += 1
                if done >= warmup_batches:
                    break
        checksum = torch.zeros((), dtype=torch.float64, device=target)
        tally = _Tally()
        start = time.perf_counter()
        for _ in range(repeats):
            for batch, waited in _timed_batches(loader, state):
                for name, reason in batch.skipped:
                    tally.skipped.setdefault(name, reason)
                copy_s = model_s = 0.0
                if batch.pixels.numel():
                    copy_s, model_s = step(batch)
                    tally.images += len(batch.names)
                tally.stages = tally.stages + StageTimes(
                    batch.decode_s, batch.preprocess_s, waited, copy_s, model_s
                )
        total = float(checksum.item())
        device.synchronize()
        wall = time.perf_counter() - start
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
        raise VitportError(f"--batch-size must be at least 1, not {batch_size}")
    if workers < 0:
        raise VitportError(f"--workers must be 0 or more, not {workers}")
    if repeats < 1:
        raise VitportError(f"--repeats must be at least 1, not {repeats}")
    if warmup_batches < 0:
        raise VitportError(f"--warmup must be 0 or more, not {warmup_batches}")
    if not paths:
        raise ImageError("no images to benchmark; pass image files or a directory")
    dataset = _ImageFiles(paths, encoder.preprocess, encoder.dtype)
    notes: list[str] = []
    used = workers
    try:
        tally, wall, checksum = _run(encoder, dataset, batch_size, used, repeats, warmup_batches)
    except _WorkersFailed as exc:
        notes.append(f"{workers} DataLoader workers could not start ({exc}); ran with 0 workers")
        used = 0
        tally, wall, checksum = _run(encoder, dataset, batch_size, used, repeats, warmup_batches)
    if tally.images == 0:
        first = next(iter(tally.skipped.items()), None)
        why = f" (first: {first[0]}: {first[1]})" if first else ""
        raise ImageError(f"none of the {len(paths)} files could be used{why}")
    return E2EResult(
        images=tally.images,
        skipped=list(tally.skipped.items()),
        batch_size=batch_size,
        workers=used,
        wall_seconds=wall,
        stages=tally.stages,
        workers_requested=workers,
        device=str(encoder.device),
        checksum=checksum,
        notes=notes,
    )
