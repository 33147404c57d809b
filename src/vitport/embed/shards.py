"""What both embed engines share: per-image outputs, the stage timing, and the collector that
writes a shard once all its inputs are in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vitport.embed.store import ShardRows, Store
from vitport.encoder import Encoder
from vitport.inputs.stream import Input


@dataclass
class Timing:
    workers: int
    model_seconds: float = 0.0
    wait_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class ShardCollector:
    """Rows arrive batch by batch, in input order; a shard is written once all its inputs are in."""

    def __init__(self, store: Store, inputs: Sequence[Input], dims: dict[str, list[int]]):
        self.store, self.inputs, self.dims = store, inputs, dims
        self.open: dict[int, ShardRows] = {}
        self.seen: set[int] = set()  # a batch Ray ran twice is taken once
        self.written = 0

    def _rows(self, index: int) -> ShardRows:
        shard = index // self.store.shard_size
        return self.open.setdefault(shard, ShardRows(shard, outputs={n: [] for n in self.dims}))

    def _first_time(self, index: int) -> bool:
        if index in self.seen:
            return False
        self.seen.add(index)
        return True

    def add(self, index: int, size: tuple[int, int], values: dict[str, np.ndarray]) -> None:
        if not self._first_time(index):
            return
        rows, item = self._rows(index), self.inputs[index]
        rows.ids.append(item.id)
        rows.paths.append(item.path)
        rows.sizes.append(size)
        for name, value in values.items():
            if name == "patches":
                rows.patches[item.id] = value
            else:
                rows.outputs[name].append(value)
        self._flush(rows.shard)

    def fail(self, index: int, failure) -> None:
        if not self._first_time(index):
            return
        rows = self._rows(index)
        rows.failures.append(failure._replace(index=index))
        self._flush(rows.shard)

    def _flush(self, shard: int) -> None:
        rows = self.open[shard]
        if rows.count == len(self.store.shard_range(shard)):
            self.store.write_shard(rows, self.dims)
            del self.open[shard]
            self.written += 1


def features_of(encoder: Encoder, pixels: torch.Tensor, names: Sequence[str]) -> list[dict]:
    """Per image, the asked-for outputs as float32 arrays."""
    groups = encoder.encode(pixels).groups()
    arrays = {n: groups[n].to("cpu", torch.float32).numpy() for n in names}
    return [{n: a[i] for n, a in arrays.items()} for i in range(pixels.shape[0])]
