"""The one streaming path from image inputs to pixel batches: DataLoader workers decode and
preprocess, the main process gets batches it can copy to the device. `infer`, `embed` and
`bench --e2e` all read through :func:`stream`.

Workers use the platform's default start method. On Linux before Python 3.14 that is ``fork``,
so the encoder's preprocess callable needs no pickling; where workers cannot start, the stream
falls back to ``workers=0`` and notes it (see :class:`Workers`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from vitport.errors import UnreadableImageError, one_line
from vitport.inputs.decode import content_sha256, read_image, read_image_bytes

WORKER_TIMEOUT_S = 300.0
"""Seconds to wait for one batch from workers before giving up (a hung worker, not a slow one)."""


@dataclass(frozen=True)
class Input:
    """One image to read: a file, or (``row`` >= 0) the bytes in row ``row`` of ``column`` of
    the Parquet file ``path``. ``problem``, when set, is why it is known unusable without
    reading it (a non-image file inside a directory): it fails with that reason, counted under
    ``problem_category``."""

    id: str
    path: str
    row: int = -1
    column: str = ""
    problem: str = ""
    problem_category: str = ""


class Failure(NamedTuple):
    index: int
    id: str
    path: str
    reason: str  # its category, one of vitport.inputs.PROBLEM_CATEGORIES
    message: str


class Item(NamedTuple):
    """One input after the worker is done with it; ``pixels`` is None when it failed."""

    index: int
    pixels: torch.Tensor | None
    size: tuple[int, int]  # width, height after EXIF orientation
    decode_s: float
    preprocess_s: float
    failure: Failure | None
    digest: str = ""  # content_sha256 of the decoded image, when asked for


class Batch(NamedTuple):
    """A collated batch; a NamedTuple so the DataLoader can pin its tensor."""

    pixels: torch.Tensor  # [B, 3, H, W] of the good items, or empty when every item failed
    indices: list[int]  # input indices of the good items, in order
    sizes: list[tuple[int, int]]
    decode_s: float
    preprocess_s: float
    failures: list[Failure]
    digests: list[str]  # of the good items, when asked for


class _ParquetRows:
    """Reads image bytes from Parquet row by row, keeping the last row group (inputs come in
    order, so a worker decompresses each row group once)."""

    def __init__(self) -> None:
        self.key: tuple[str, str, int] | None = None
        self.values: list[Any] = []
        self.offsets: dict[str, list[int]] = {}

    def get(self, path: str, column: str, row: int) -> bytes:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata if path not in self.offsets else None
        if meta is not None:
            starts, total = [], 0
            for g in range(meta.num_row_groups):
                starts.append(total)
                total += meta.row_group(g).num_rows
            self.offsets[path] = starts
        starts = self.offsets[path]
        group = max(g for g, start in enumerate(starts) if start <= row)
        if self.key != (path, column, group):
            table = pq.ParquetFile(path).read_row_group(group, columns=[column])
            self.values = table.column(0).to_pylist()
            self.key = (path, column, group)
        value = self.values[row - starts[group]]
        return value.get("bytes") if isinstance(value, dict) else value


class ImageInputs(Dataset):
    """Inputs decoded and preprocessed one at a time; failures become marked items."""

    def __init__(
        self,
        inputs: Sequence[Input],
        preprocess: Callable[[list[Any]], torch.Tensor],
        dtype: torch.dtype | None = None,  # cast in the worker: a 16-bit dtype halves the copy
        digests: bool = False,  # hash each decoded image (golden files match images by content)
    ) -> None:
        self.inputs = list(inputs)
        self.preprocess = preprocess
        self.dtype = dtype
        self.digests = digests
        self._rows = _ParquetRows()

    def __len__(self) -> int:
        return len(self.inputs)

    def read(self, item: Input):
        if item.row < 0:
            return read_image(item.path)
        return read_image_bytes(self._rows.get(item.path, item.column, item.row) or b"", item.id)

    def __getitem__(self, index: int) -> Item:
        item = self.inputs[index]
        t0 = time.perf_counter()
        if item.problem:
            return self._failed(index, item, t0, item.problem_category, item.problem)
        try:
            image = self.read(item)
        except UnreadableImageError as exc:
            return self._failed(index, item, t0, exc.category, exc.reason)
        except Exception as exc:  # read_image should not raise these; never crash a long run
            message = f"could not read: {one_line(exc, typed=True)}"
            return self._failed(index, item, t0, "unreadable", message)
        t1 = time.perf_counter()
        try:
            pixels = self.preprocess([image])[0]
            pixels = pixels if self.dtype is None else pixels.to(self.dtype)
        except Exception as exc:  # one odd image must not stop the run
            failure = Failure(
                index,
                item.id,
                item.path,
                "preprocess",
                f"preprocessing failed: {one_line(exc, typed=True)}",
            )
            return Item(index, None, image.size, t1 - t0, time.perf_counter() - t1, failure)
        digest = content_sha256(image) if self.digests else ""
        return Item(index, pixels, image.size, t1 - t0, time.perf_counter() - t1, None, digest)

    @staticmethod
    def _failed(index: int, item: Input, t0: float, category: str, message: str) -> Item:
        failure = Failure(index, item.id, item.path, category, message)
        return Item(index, None, (0, 0), time.perf_counter() - t0, 0.0, failure)


def collate(items: list[Item]) -> Batch:
    """Stack the good items; failed ones are reported, an all-failed batch is empty."""
    good = [it for it in items if it.pixels is not None]
    return Batch(
        pixels=torch.stack([it.pixels for it in good]) if good else torch.empty(0),
        indices=[it.index for it in good],
        sizes=[it.size for it in good],
        decode_s=sum(it.decode_s for it in items),
        preprocess_s=sum(it.preprocess_s for it in items),
        failures=[it.failure for it in items if it.failure is not None],
        digests=[it.digest for it in good],
    )


def make_loader(dataset: ImageInputs, batch_size: int, workers: int, pin: bool) -> DataLoader:
    """The DataLoader; a module-level function so tests can change how workers start."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        persistent_workers=False,
        timeout=WORKER_TIMEOUT_S if workers > 0 else 0,
        prefetch_factor=4 if workers > 0 else None,
    )


class WorkersFailed(Exception):
    """DataLoader workers could not start; carries the one-line reason."""


@dataclass
class Workers:
    """The DataLoader workers a stream asks for and uses. ``used`` drops to 0, with a note,
    when they cannot start; once a batch has come from them, a later failure is a real error."""

    requested: int
    used: int = field(init=False)  # ``requested`` until the workers fail to start
    notes: list[str] = field(default_factory=list)
    started: bool = False
    lost_seconds: float = 0.0  # spent on workers that never started

    def __post_init__(self) -> None:
        self.used = self.requested


def stream(
    dataset: ImageInputs, batch_size: int, workers: Workers, pin: bool
) -> Iterator[tuple[Batch, float]]:
    """One pass over ``dataset``: each batch with the seconds spent waiting for it. Where the
    workers cannot start, the pass goes on with none, unpinned, and ``workers`` notes why; give
    the same ``workers`` to each pass over a dataset."""
    t0 = time.perf_counter()
    pin = pin and workers.used == workers.requested
    batches = _timed_batches(make_loader(dataset, batch_size, workers.used, pin), workers)
    try:
        first = next(batches, None)
    except WorkersFailed as exc:
        workers.notes.append(
            f"{workers.used} DataLoader workers could not start ({exc}); ran with 0 workers"
        )
        workers.used = 0
        workers.lost_seconds += time.perf_counter() - t0
        batches = _timed_batches(make_loader(dataset, batch_size, 0, False), workers)
        first = next(batches, None)
    if first is not None:
        yield first
        yield from batches


def _timed_batches(loader: DataLoader, workers: Workers) -> Iterator[tuple[Batch, float]]:
    """(batch, seconds waited for it); start-up failures of workers become WorkersFailed."""

    def failed() -> bool:
        return loader.num_workers > 0 and not workers.started

    try:
        iterator = iter(loader)
    except Exception as exc:
        if failed():
            raise WorkersFailed(one_line(exc, typed=True)) from exc
        raise
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            if failed():
                raise WorkersFailed(one_line(exc, typed=True)) from exc
            raise
        waited = time.perf_counter() - t0
        workers.started = True
        yield batch, waited


def file_inputs(paths: Sequence[Path | str]) -> list[Input]:
    """Files as inputs, each named by its path as given."""
    return [Input(id=str(p), path=str(p)) for p in paths]
