"""`embed`: features for whole image collections, resumable, losing nothing.

    summary = vitport.embed.embed(["photos/"], "demo:dinov2-small", "features/")
    table = vitport.embed.read("features/")              # a pyarrow Table, one row per image
    ids, pooled = vitport.embed.read("features/", arrays=True)["id"], ...["pooled"]

Every input ends as a row in ``part-NNNNN.parquet`` or in ``errors.parquet``; a killed run
started again with the same command resumes where it stopped (see `vitport.embed.store`). On
Ctrl-C, what is done is kept first, and `Interrupted` says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitport import records
from vitport.embed.shards import ShardCollector, Timing, features_of
from vitport.embed.sources import collect, fingerprint
from vitport.embed.store import Store, named_resample
from vitport.encoder import Encoder
from vitport.errors import VitportError
from vitport.format import count
from vitport.inputs.stream import Input

OUTPUT_NAMES = ("cls", "pooled", "registers", "patches")
DEFAULT_SHARD_SIZE = 10_000


@dataclass
class EmbedSummary:
    """What one `embed` call did."""

    out: str
    inputs: int
    embedded: int  # rows in the directory now
    errors: int
    complete: bool
    written_now: int  # inputs processed by this call (embedded or failed)
    skipped_done: int  # inputs already written by an earlier run
    batch_size: int
    workers: int
    seconds: float
    model_seconds: float
    wait_seconds: float
    outputs: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    engine: str = "local"
    error_reasons: dict[str, int] = field(default_factory=dict)  # reason -> count, all runs
    batch_size_reason: str = ""  # how batch_size was chosen; empty when nothing was run

    @property
    def images_per_second(self) -> float:
        return self.written_now / self.seconds if self.seconds > 0 else 0.0

    def bottleneck(self) -> str:
        if self.seconds <= 0 or not self.written_now:
            return "nothing to do: every input was already written"
        if self.engine != "local":
            return "stages are timed by the local engine only"
        model, wait = self.model_seconds / self.seconds, self.wait_seconds / self.seconds
        if wait > model:
            return (
                f"data loading: the model waited {100 * wait:.0f}% of the time for images "
                f"(model {100 * model:.0f}%); add --workers (now {self.workers})"
            )
        return f"model-bound: {100 * model:.0f}% of the time in the model"

    def to_dict(self) -> dict[str, Any]:
        return {
            **records.to_dict(self),
            "images_per_second": self.images_per_second,
            "bottleneck": self.bottleneck(),
        }


def default_outputs(encoder: Encoder) -> list[str]:
    return ["cls", "pooled"] if encoder.layout.num_cls else ["pooled"]


def check_output_names(text: str | Sequence[str]) -> list[str]:
    """The asked-for outputs, refused before any work when one is not an output at all."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names or any(n not in OUTPUT_NAMES for n in names):
        raise VitportError(
            f"outputs={','.join(names)}: choose from {', '.join(OUTPUT_NAMES)}",
            params=("outputs=",),
        )
    return names


def parse_outputs(text: str | Sequence[str] | None, encoder: Encoder) -> list[str]:
    if text is None:
        return default_outputs(encoder)
    names = check_output_names(text)
    if "cls" in names and not encoder.layout.num_cls:
        raise VitportError(
            f"{encoder.spec} has no CLS token; use outputs='pooled'", params=("outputs='pooled'",)
        )
    if "registers" in names and not encoder.layout.num_registers:
        raise VitportError(
            f"{encoder.spec} has no register tokens; drop registers from outputs=...",
            params=("outputs=...",),
        )
    return list(dict.fromkeys(names))


def output_dims(encoder: Encoder, outputs: Sequence[str]) -> dict[str, list[int]]:
    """The shape of each output per image, from one forward pass on a blank image."""
    h, w = encoder.image_size
    probe = encoder.encode(torch.zeros(1, 3, h, w)).groups()
    return {name: list(probe[name].shape[1:]) for name in outputs}


def settings_of(
    encoder: Encoder, outputs: dict[str, list[int]], inputs: Sequence[Input], shard_size: int
) -> dict[str, Any]:
    meta = encoder.meta()
    return {
        "model": encoder.spec,
        "weights_sha256": encoder.weights_sha256,
        "family": encoder.family,
        "device": str(encoder.device),
        "dtype": meta["dtype"],
        "fixes": list(encoder.fixes),
        "runtime": encoder.runtime,
        "preprocessing": named_resample(meta["preprocess"]),
        "outputs": outputs,
        "shard_size": shard_size,
        "inputs": len(inputs),
        "inputs_sha256": fingerprint(inputs),
    }


def auto_batch_size(
    encoder: Encoder, images: int, progress: Callable[[str], None] = lambda _: None
) -> tuple[int, str]:
    """The batch size bench's auto search finds fastest (doubling until out of memory, no gain,
    or past the number of images to embed), with a short measuring window; and why, in words."""
    from vitport.bench.run import AUTO_MAX_BATCH, Window, sweep

    runs, out_of_memory = sweep(
        encoder,
        None,
        Window(1, 0.2, 3, 0.5),
        progress=lambda step: progress(f"finding a batch size that fits: {step}"),
        max_batch=min(max(images, 1), AUTO_MAX_BATCH),
    )
    best = max(runs, key=lambda r: r.measurement.images_per_second)
    tried = ", ".join(str(r.batch_size) for r in runs)
    why = (
        f"the fastest of {tried} in a short sweep on {encoder.device} "
        f"({best.measurement.images_per_second:.1f} img/s)"
    )
    if out_of_memory:
        why += f"; {out_of_memory} ran out of memory"
    elif runs[-1].batch_size * 2 > images:
        why += f"; larger batches than the {count(images, 'image')} to embed gain nothing"
    return best.batch_size, why


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        index, count = (int(p) for p in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if count < 1 or not 0 <= index < count:
        raise VitportError(f"shard={text}: give I/N with 0 <= I < N, e.g. 0/4", params=("shard=",))
    return index, count


def embed(
    sources: Sequence[str],
    model: str | Encoder,
    out: str | Path,
    *,
    device: str = "auto",
    dtype: str = "fp32",
    batch_size: int | None = None,
    workers: int = 2,
    image_size: int | None = None,
    weights: str | Path | None = None,
    trust_remote_code: bool = False,
    fixes: Sequence[str] = (),
    runtime: str = "torch",
    outputs: str | Sequence[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    column: str | None = None,
    overwrite: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
    shard: str | None = None,
    stall_timeout: float | None = None,
    progress: Callable[[str], None] = lambda _: None,
    on_batch: Callable[[int, int], None] = lambda done, total: None,
) -> EmbedSummary:
    """Embed every image of `sources` with `model` into `out` (see the module docstring).

    Every argument, source and the output directory are checked before the model loads."""
    from vitport.embed.store import check_out
    from vitport.fixes import parse_fixes
    from vitport.outputs import check_dir
    from vitport.runtimes import Setup, load, runner

    if shard_size < 1:
        raise VitportError(
            f"shard_size must be at least 1, not {shard_size}", params=("shard_size",)
        )
    if engine not in ("local", "ray"):
        raise VitportError(f"engine={engine}: use local or ray", params=("engine=",))
    if stall_timeout is not None and (engine != "ray" or stall_timeout <= 0):
        raise VitportError(
            f"stall_timeout={stall_timeout:g}: give seconds above 0, with engine='ray'",
            params=("stall_timeout=", "engine='ray'"),
        )
    worker, of = parse_shard(shard)
    if overwrite and of > 1:
        raise VitportError(
            "overwrite=True with shard=... would let each task delete the others' finished "
            "shards; clear the directory once before starting the tasks",
            params=("overwrite=True", "shard=..."),
        )
    if outputs is not None:
        check_output_names(outputs)
    fixes = parse_fixes(list(fixes))
    setup = Setup(model.runtime if isinstance(model, Encoder) else runtime, dtype, fixes=fixes)
    if batch_size:  # refused before the model loads
        runner(setup.runtime).limits.check_batch(setup.runtime, batch_size)
    inputs = collect(sources, column)
    out = Path(out).expanduser()
    check_dir(out, "out", overwrite=True, ours=lambda _p: True)  # writable; Store decides more
    known = {"shard_size": shard_size, "inputs": len(inputs), "inputs_sha256": fingerprint(inputs)}
    check_out(out, overwrite, known)
    if isinstance(model, Encoder):
        encoder = model
    else:
        progress(f"loading {model}")
        encoder = load(
            model,
            device,
            setup,
            image_size=image_size,
            weights=weights,
            trust_remote_code=trust_remote_code,
        ).encoder
    names = parse_outputs(outputs, encoder)
    dims = output_dims(encoder, names)
    store = Store(out, settings_of(encoder, dims, inputs, shard_size), len(inputs))
    store.open(overwrite)
    todo = store.todo(worker, of)
    found = store.found_pieces()
    total_todo = sum(len(store.remaining(k, found)) for k in todo)
    try:
        batch_size_reason = "given (--batch-size)" if batch_size else ""
        if todo and batch_size is None:
            batch_size, batch_size_reason = auto_batch_size(encoder, total_todo, progress)
        batch_size = batch_size or 1
        start = time.perf_counter()
        if engine == "ray":
            from vitport.embed.ray_engine import DEFAULT_STALL_TIMEOUT, run_ray

            load_options = {
                "weights": str(weights) if weights else None,
                "trust_remote_code": trust_remote_code,
            }
            timing = run_ray(
                encoder,
                inputs,
                store,
                todo,
                dims,
                batch_size,
                ray_address,
                on_batch,
                load_options,
                stall_timeout or DEFAULT_STALL_TIMEOUT,
            )
        else:
            timing = run_local(encoder, inputs, store, todo, dims, batch_size, workers, on_batch)
        seconds = time.perf_counter() - start
    except KeyboardInterrupt:
        counts = store.write_manifest()["counts"]
        raise Interrupted(
            f"{counts['embedded'] + counts['errors']} of {count(len(inputs), 'input')} kept in "
            f"{out}; run the same command again to resume"
        ) from None
    store.gather_errors()  # also after a run with nothing left to do, or another task's finish
    manifest = store.write_manifest()
    mine = sum(len(store.shard_range(k)) for k in range(store.num_shards) if k % of == worker)
    return EmbedSummary(
        out=str(out),
        inputs=len(inputs),
        embedded=manifest["counts"]["embedded"],
        errors=manifest["counts"]["errors"],
        complete=manifest["complete"],
        written_now=total_todo,
        skipped_done=mine - total_todo,
        batch_size=batch_size,
        batch_size_reason=batch_size_reason,
        workers=timing.workers,
        seconds=seconds,
        model_seconds=timing.model_seconds,
        wait_seconds=timing.wait_seconds,
        outputs=dims,
        notes=timing.notes,
        engine=engine,
        error_reasons=store.error_reasons(),
    )


class Interrupted(KeyboardInterrupt):
    """An embed run stopped by Ctrl-C after keeping what it did (see `vitport.embed.store`);
    its message says how much, and that the same command resumes."""


def run_local(
    encoder: Encoder,
    inputs: Sequence[Input],
    store: Store,
    todo: Sequence[int],
    dims: dict[str, list[int]],
    batch_size: int,
    workers: int,
    on_batch: Callable[[int, int], None],
) -> Timing:
    """DataLoader workers decode and preprocess; the main process runs the model and writes."""
    from vitport.inputs import stream

    found = store.found_pieces()
    order = [i for k in todo for i in store.remaining(k, found)]
    timing = Timing(workers)
    if not order:
        return timing
    device = encoder.device
    pin = device.pin_memory
    dataset = stream.ImageInputs([inputs[i] for i in order], encoder.preprocess, encoder.dtype)
    collector = ShardCollector(store, inputs, dims, found)
    pool = stream.Workers(workers)
    done = 0
    try:
        for batch, waited in stream.stream(dataset, batch_size, pool, pin):
            timing.wait_seconds += waited
            for failure in batch.failures:
                collector.fail(order[failure.index], failure)
            if batch.indices:
                t0 = time.perf_counter()
                pixels = batch.pixels.to(device.torch_device, non_blocking=pin).to(encoder.dtype)
                rows = features_of(encoder, pixels, list(dims))
                timing.model_seconds += time.perf_counter() - t0
                for local, size, values in zip(batch.indices, batch.sizes, rows, strict=True):
                    collector.add(order[local], size, values)
            done += len(batch.indices) + len(batch.failures)
            on_batch(done, len(order))
    except KeyboardInterrupt:
        collector.keep()
        raise
    timing.workers = pool.used
    timing.notes += pool.notes
    return timing


def read(directory: str | Path, arrays: bool = False, columns: Sequence[str] | None = None):
    """The embedded rows of DIR as one pyarrow Table (in input order), or with `arrays=True`
    a dict of numpy arrays: ``id``/``path`` as lists, each output as ``[rows, *shape]``."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vitport.embed.store import PIECE

    directory = Path(directory)
    parts = sorted(directory.glob("part-*.parquet"))  # pieces sort before their shard's part
    whole = {p.name.split(".")[0] for p in parts if not PIECE.fullmatch(p.name)}
    parts = [p for p in parts if p.name.split(".")[0] not in whole or not PIECE.fullmatch(p.name)]
    if not (directory / "manifest.json").is_file():
        raise VitportError(f"{directory} is not a vitport embed directory (no manifest.json)")
    tables = [pq.read_table(p, columns=list(columns) if columns else None) for p in parts]
    if not tables:
        settings = json.loads((directory / "manifest.json").read_text())["settings"]
        raise VitportError(f"{directory} has no rows yet ({settings['inputs']} inputs to embed)")
    table = pa.concat_tables(tables)
    if not arrays:
        return table
    result: dict[str, Any] = {}
    for name in table.column_names:
        column = table.column(name)
        kind = column.type
        if pa.types.is_fixed_size_list(kind):
            shape = json.loads(table.schema.field(name).metadata[b"shape"])
            flat = column.combine_chunks().flatten().to_numpy()
            result[name] = np.require(flat.reshape(len(table), *shape), requirements="W")
        else:
            result[name] = column.to_pylist()
    return result


__all__ = ["EmbedSummary", "Interrupted", "embed", "read"]
