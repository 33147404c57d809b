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

    def __init__(
        self,
        store: Store,
        inputs: Sequence[Input],
        dims: dict[str, list[int]],
        found: dict[int, dict[int, int]] | None = None,
    ):
        self.store, self.inputs, self.dims = store, inputs, dims
        self.found = store.found_pieces() if found is None else found  # pieces as the run began
        self.open: dict[int, ShardRows] = {}
        self.need: dict[int, range] = {}  # per open shard: the inputs this run embeds of it
        self.embedded: dict[int, list[int]] = {}  # per open shard: the input of each row
        self.seen: set[int] = set()  # a batch Ray ran twice is taken once
        self.written = 0

    def _rows(self, index: int) -> ShardRows:
        shard = index // self.store.shard_size
        if shard not in self.open:
            self.need[shard] = self.store.remaining(shard, self.found)  # after its pieces
            self.embedded[shard] = []
            self.open[shard] = ShardRows(shard, outputs={n: [] for n in self.dims})
        return self.open[shard]

    def _first_time(self, index: int) -> bool:
        if index in self.seen:
            return False
        self.seen.add(index)
        return True

    def add(self, index: int, size: tuple[int, int], values: dict[str, np.ndarray]) -> None:
        if not self._first_time(index):
            return
        rows, item = self._rows(index), self.inputs[index]
        self.embedded[rows.shard].append(index)
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
        if rows.count == len(self.need[shard]):
            self.store.write_shard(rows, self.dims)
            del self.open[shard]
            self.written += 1

    def keep(self) -> None:
        """When the run is interrupted: write each open shard that is whole, and keep of the
        others, as a piece, the rows that follow on from where the shard stood without a gap
        (any after a gap are embedded again when the run resumes)."""
        for shard in list(self.open):
            rows, need = self.open[shard], self.need[shard]
            if rows.count == len(need):
                self._flush(shard)
                continue
            have = {*self.embedded[shard], *(f.index for f in rows.failures)}
            stop = need.start
            while stop < need.stop and stop in have:
                stop += 1
            if stop > need.start:
                self.store.write_piece(self._before(rows, stop), self.dims, need.start, stop)
            del self.open[shard]

    def _before(self, rows: ShardRows, stop: int) -> ShardRows:
        """The rows of inputs before `stop`."""
        kept = ShardRows(rows.shard, outputs={n: [] for n in rows.outputs})
        for k, index in enumerate(self.embedded[rows.shard]):
            if index < stop:
                kept.ids.append(rows.ids[k])
                kept.paths.append(rows.paths[k])
                kept.sizes.append(rows.sizes[k])
                for name, values in rows.outputs.items():
                    if values:
                        kept.outputs[name].append(values[k])
                if rows.ids[k] in rows.patches:
                    kept.patches[rows.ids[k]] = rows.patches[rows.ids[k]]
        kept.failures = [f for f in rows.failures if f.index < stop]
        return kept


def features_of(encoder: Encoder, pixels: torch.Tensor, names: Sequence[str]) -> list[dict]:
    """Per image, the asked-for outputs as float32 arrays."""
    groups = encoder.encode(pixels).groups()
    arrays = {n: groups[n].to("cpu", torch.float32).numpy() for n in names}
    return [{n: a[i] for n, a in arrays.items()} for i in range(pixels.shape[0])]
