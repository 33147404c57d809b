"""The output contract of `embed`, and resuming it.

    DIR/part-NNNNN.parquet        one row per embedded image (id, path, width, height, outputs)
    DIR/patches-NNNNN.safetensors patch tokens keyed by id, when asked for
    DIR/errors.parquet            one row per input that could not be embedded
    DIR/manifest.json             settings, counts, and `complete`

Shard NNNNN holds inputs [N * shard_size, (N + 1) * shard_size). Its files are written under a
temporary name and renamed; the part file comes last, so its existence records the shard as done.

An interrupted run (Ctrl-C) keeps what it did of an unfinished shard as a piece: the same files
for inputs [A, B) of shard N, named ``part-NNNNN.AAAAAAAAA-BBBBBBBBB.parquet`` (its marker, written
last), ``patches-NNNNN.AAAAAAAAA-BBBBBBBBB.safetensors`` and its error rows. The pieces of a shard
follow one another from its first input; a resumed run embeds the rest, and once the shard is
whole, writes it as one part file, as an uninterrupted run does, and removes its pieces.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitport.errors import VitportError
from vitport.inputs.stream import Failure
from vitport.outputs import write_atomic

MANIFEST = "manifest.json"
ERRORS = "errors.parquet"
STATE = ".vitport"  # per-shard error tables, before they are gathered into errors.parquet
IDENTITY = (
    "weights_sha256",
    "family",
    "dtype",
    "fixes",
    "preprocessing",
    "outputs",
    "shard_size",
    "inputs_sha256",
    "inputs",
)


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def patches_name(shard: int) -> str:
    return f"patches-{shard:05d}.safetensors"


def piece_span(shard: int, start: int, stop: int) -> str:
    """What names the files of the piece holding inputs [start, stop) of `shard`."""
    return f"{shard:05d}.{start:09d}-{stop:09d}"


PIECE = re.compile(r"part-(\d+)\.(\d+)-(\d+)\.parquet")


@dataclass
class ShardRows:
    """What one shard produced, in input order."""

    shard: int
    ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)  # name -> per-row arrays
    patches: dict[str, np.ndarray] = field(default_factory=dict)  # id -> [N, D]
    failures: list[Failure] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.ids) + len(self.failures)


class Store:
    """One embed output directory."""

    def __init__(self, directory: Path, settings: dict[str, Any], num_inputs: int) -> None:
        self.dir = Path(directory)
        self.settings = settings
        self.num_inputs = num_inputs
        self.shard_size = int(settings["shard_size"])

    @property
    def num_shards(self) -> int:
        return -(-self.num_inputs // self.shard_size)

    def shard_range(self, shard: int) -> range:
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.num_inputs))

    # --- opening ---------------------------------------------------------------------------

    def open(self, overwrite: bool) -> None:
        """Create DIR, or resume it when it holds the same run; refuse anything else."""
        manifest = self.dir / MANIFEST
        check_out(self.dir, overwrite, self.settings)
        if manifest.is_file() and overwrite:
            self._clear()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not manifest.is_file():
                self.write_manifest()  # first: a --shard task starting beside this one sees it
            (self.dir / STATE).mkdir(exist_ok=True)
            probe = self.dir / STATE / f"probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise VitportError(
                f"cannot write to {self.dir} ({exc.strerror or exc}); choose another out=...",
                params=("out=...",),
            ) from exc
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Temporary files of killed runs on this host (other hosts' may still be writing), and
        the pieces of shards written whole (a run killed before it removed them)."""
        host = socket.gethostname()
        for folder in (self.dir, self.dir / STATE):
            for tmp in folder.glob(f".*.tmp-{host}-*"):
                pid = tmp.name.rsplit("-", 1)[-1]
                if pid.isdigit() and not _alive(int(pid)):
                    tmp.unlink(missing_ok=True)
        for shard in self.found_pieces():
            if shard < self.num_shards and self.done(shard):
                self._remove_pieces(shard)

    def _clear(self) -> None:
        for path in self.dir.iterdir():
            if path.name in (MANIFEST, ERRORS, STATE) or path.name.startswith(
                ("part-", "patches-", ".part-", ".patches-")
            ):
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    # --- shards ----------------------------------------------------------------------------

    def done(self, shard: int) -> bool:
        return (self.dir / part_name(shard)).is_file()

    def todo(self, worker: int = 0, workers: int = 1) -> list[int]:
        """Shards not yet written, of those this worker (`--shard I/N`) owns."""
        return [k for k in range(self.num_shards) if k % workers == worker and not self.done(k)]

    def found_pieces(self, shard: int | None = None) -> dict[int, dict[int, int]]:
        """Per shard, the pieces on disk as {start: stop}: of `shard`, or of every shard (one
        listing of the directory, not one per shard)."""
        found: dict[int, dict[int, int]] = {}
        head = "part-*" if shard is None else f"part-{shard:05d}"
        for path in self.dir.glob(f"{head}.*-*.parquet"):
            match = PIECE.fullmatch(path.name)
            if match:
                found.setdefault(int(match[1]), {})[int(match[2])] = int(match[3])
        return found

    def pieces(
        self, shard: int, found: dict[int, dict[int, int]] | None = None
    ) -> list[tuple[int, int]]:
        """The input ranges [start, stop) kept of unfinished `shard` by interrupted runs, in
        order: those that follow one another from its first input (no other is ever written).
        `found`: the pieces of every shard, when the caller has listed them already."""
        stops = (self.found_pieces(shard) if found is None else found).get(shard, {})
        chain, at = [], self.shard_range(shard).start
        while at in stops:
            chain.append((at, stops[at]))
            at = stops[at]
        return chain

    def remaining(self, shard: int, found: dict[int, dict[int, int]] | None = None) -> range:
        """The inputs of `shard` still to embed: none once it is done, else those after its
        pieces (`found`: as for `pieces`)."""
        whole = self.shard_range(shard)
        if self.done(shard):
            return range(whole.stop, whole.stop)
        pieces = self.pieces(shard, found)
        return range(pieces[-1][1] if pieces else whole.start, whole.stop)

    def _piece_files(self, shard: int, start: int, stop: int) -> list[Path]:
        span = piece_span(shard, start, stop)
        return [
            self.dir / STATE / f"errors-{span}.parquet",
            self.dir / f"patches-{span}.safetensors",
            self.dir / f"part-{span}.parquet",
        ]

    def _remove_pieces(self, shard: int) -> None:
        for start, stop in self.pieces(shard):
            for path in self._piece_files(shard, start, stop):
                path.unlink(missing_ok=True)

    def write_shard(self, rows: ShardRows, dims: Mapping[str, list[int]]) -> None:
        """Errors, patches, then the part file, each atomically; the part marks it done. The
        shard's pieces, if any, are joined in before `rows`, then removed."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        pieces = [self._piece_files(rows.shard, a, b) for a, b in self.pieces(rows.shard)]
        errors = pa.concat_tables(
            [*(pq.read_table(files[0]) for files in pieces), _errors_table(rows.failures)]
        )
        columns = {name: shape for name, shape in dims.items() if name != "patches"}
        table = pa.concat_tables(
            [*(pq.read_table(files[2]) for files in pieces), rows_table(rows, columns)]
        )
        patches = dict(rows.patches)
        if "patches" in dims:
            from safetensors.numpy import load_file

            patches = {
                **{k: v for files in pieces for k, v in load_file(str(files[1])).items()},
                **patches,
            }
        self._write(rows.shard, errors, patches, table, self.dir / part_name(rows.shard))
        self._remove_pieces(rows.shard)
        self.gather_errors()
        self.write_manifest()

    def write_piece(
        self, rows: ShardRows, dims: Mapping[str, list[int]], start: int, stop: int
    ) -> None:
        """Keep `rows`, inputs [start, stop) of an unfinished shard, as a piece of it."""
        columns = {name: shape for name, shape in dims.items() if name != "patches"}
        errors, part, patches, marker = (
            _errors_table(rows.failures),
            rows_table(rows, columns),
            rows.patches,
            self._piece_files(rows.shard, start, stop)[2],
        )
        self._write(rows.shard, errors, patches, part, marker, start, stop)
        self.gather_errors()
        self.write_manifest()

    def _write(self, shard, errors, patches, table, marker: Path, *span: int) -> None:
        """The error rows, the patches and then the rows (`marker`), each atomically."""
        import pyarrow.parquet as pq

        error_file, patches_file = (
            self._piece_files(shard, *span)[:2]
            if span
            else (self.dir / STATE / f"errors-{shard:05d}.parquet", self.dir / patches_name(shard))
        )
        try:
            write_atomic(error_file, lambda p: pq.write_table(errors, p))
            if patches:
                from safetensors.numpy import save_file

                write_atomic(patches_file, lambda p: save_file(patches, str(p)))
            write_atomic(marker, lambda p: _write_part(table, p))
        except OSError as exc:
            full = exc.errno == errno.ENOSPC
            raise VitportError(
                f"{'disk full' if full else 'cannot write'} while writing shard {shard} in "
                f"{self.dir} ({exc.strerror or exc}); the shards already written stay valid: "
                f"{'free space' if full else 'fix the directory'} and run the same command again"
            ) from exc

    def gather_errors(self) -> None:
        """errors.parquet: the error rows of every finished shard (its part file written)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        found = self.found_pieces()
        parts = [
            path
            for k in range(self.num_shards)
            for path in (
                [self.dir / STATE / f"errors-{k:05d}.parquet"]
                if self.done(k)
                else [self._piece_files(k, a, b)[0] for a, b in self.pieces(k, found)]
            )
        ]
        tables = [pq.read_table(p) for p in parts]
        table = pa.concat_tables(tables) if tables else _errors_table([])
        write_atomic(self.dir / ERRORS, lambda p: pq.write_table(table, p))

    def error_reasons(self) -> dict[str, int]:
        """How many inputs errors.parquet holds, by reason."""
        import pyarrow.parquet as pq

        path = self.dir / ERRORS
        if not path.is_file():
            return {}
        reasons = pq.read_table(path, columns=["reason"]).column(0).to_pylist()
        return {r: reasons.count(r) for r in sorted(set(reasons))}

    # --- the manifest ----------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        import pyarrow.parquet as pq

        embedded = errors = 0
        shards = 0
        found = self.found_pieces()
        for k in range(self.num_shards):
            if self.done(k):
                shards += 1
                written = [(self.dir / part_name(k), self.dir / STATE / f"errors-{k:05d}.parquet")]
            else:
                written = [
                    (files[2], files[0])
                    for files in (self._piece_files(k, a, b) for a, b in self.pieces(k, found))
                ]
            for part, error_file in written:
                embedded += pq.ParquetFile(part).metadata.num_rows
                errors += pq.ParquetFile(error_file).metadata.num_rows
        return {
            "inputs": self.num_inputs,
            "embedded": embedded,
            "errors": errors,
            "shards": self.num_shards,
            "shards_done": shards,
        }

    def write_manifest(self) -> dict[str, Any]:
        from vitport import __version__

        counts = self.counts()
        manifest = {
            "vitport_version": __version__,
            "settings": self.settings,
            "counts": {k: counts[k] for k in ("inputs", "embedded", "errors")},
            "shards": {"total": counts["shards"], "done": counts["shards_done"]},
            "complete": counts["embedded"] + counts["errors"] == self.num_inputs,
        }
        write_atomic(self.dir / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))
        return manifest


def check_out(directory: Path, overwrite: bool, settings: Mapping[str, Any]) -> None:
    """Refuse an --out that is a file, holds files vitport did not write, or (without
    `overwrite`) holds another run: of the identity settings, those in `settings` are compared,
    so a caller checks the inputs before a model loads, and Store.open everything after."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if directory.exists() and not directory.is_dir():
        raise VitportError(f"out={directory} is a file; give a directory", params=("out=",))
    if manifest.is_file():
        if not overwrite:
            theirs = dict(json.loads(manifest.read_text()).get("settings", {}))
            if isinstance(theirs.get("preprocessing"), dict):  # older manifests: resample "3"
                theirs["preprocessing"] = named_resample(theirs["preprocessing"])
            for key in (k for k in IDENTITY if k in settings):
                if theirs.get(key) != settings[key]:
                    raise VitportError(
                        f"{directory} was written with another {key.replace('_', ' ')} "
                        f"({_short(theirs.get(key))} there, {_short(settings[key])} here); "
                        "pass overwrite=True to start over, or choose another out=...",
                        params=("overwrite=True", "out=..."),
                    )
    elif directory.is_dir() and any(not _starting(p) for p in directory.iterdir()):
        raise VitportError(
            f"out={directory} holds files vitport did not write (no {MANIFEST}); "
            "choose a new or empty directory",
            params=("out=",),
        )


def named_resample(preprocessing: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing settings with the resampling filter by name: transformers keeps PIL's
    number ("3"), the manifest says "bicubic"."""
    from PIL import Image

    named = dict(preprocessing)
    with contextlib.suppress(KeyError, TypeError, ValueError):  # none recorded, or a name
        named["resample"] = Image.Resampling(int(named["resample"])).name.lower()
    return named


def _starting(path: Path) -> bool:
    """What another task writes first into a directory it is starting: the manifest's temporary
    file and the state folder."""
    return path.name == STATE or path.name.startswith(f".{MANIFEST}.tmp-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _errors_table(failures: Sequence[Failure]):
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array([f.id for f in failures], pa.string()),
            "path": pa.array([f.path for f in failures], pa.string()),
            "reason": pa.array([f.reason for f in failures], pa.string()),
            "message": pa.array([f.message for f in failures], pa.string()),
        }
    )


def _write_part(table, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path)


def rows_table(rows: ShardRows, dims: Mapping[str, list[int]]):
    """The part files' columns as a pyarrow Table: id, path, width, height and one float32
    vector column per output in `dims` (its shape in the field's metadata)."""
    import pyarrow as pa

    fields = [
        pa.field("id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
    columns: list[Any] = [
        rows.ids,
        rows.paths,
        [w for w, _ in rows.sizes],
        [h for _, h in rows.sizes],
    ]
    for name, shape in dims.items():
        width = int(np.prod(shape))
        kind = pa.list_(pa.float32(), width)
        fields.append(pa.field(name, kind, metadata={"shape": json.dumps(shape)}))
        values = np.asarray(rows.outputs.get(name, []), dtype=np.float32).reshape(-1)
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), width))
    schema = pa.schema(fields)
    return pa.Table.from_arrays(
        [
            c if isinstance(c, pa.Array) else pa.array(c, f.type)
            for c, f in zip(columns, fields, strict=True)
        ],
        schema=schema,
    )
