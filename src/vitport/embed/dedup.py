"""Near-duplicate pairs in an embed directory: cosine similarity at or above a threshold."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitport.errors import VitportError
from vitport.format import count
from vitport.outputs import write_atomic

BLOCK = 4096  # rows per side of one similarity tile: 4096 x 4096 float32 is 64 MiB


@dataclass
class Pairs:
    a: list[str]
    b: list[str]
    cosine: np.ndarray
    method: str
    threshold: float
    embeddings: int  # how many vectors were compared

    def describe(self) -> str:
        """'N pairs with cosine ≥ T among M embeddings'."""
        return (
            f"{count(len(self), 'pair')} with cosine ≥ {self.threshold:g} "
            f"among {count(self.embeddings, 'embedding')}"
        )

    def __len__(self) -> int:
        return len(self.a)

    def top(self, count: int) -> list[tuple[str, str, float]]:
        order = np.argsort(-self.cosine, kind="stable")[:count]
        return [(self.a[i], self.b[i], float(self.cosine[i])) for i in order]


def _normalised(directory: Path, column: str) -> tuple[list[str], np.ndarray]:
    import json

    from vitport.embed import read

    manifest = directory / "manifest.json"
    outputs = json.loads(manifest.read_text())["settings"]["outputs"] if manifest.is_file() else {}
    if manifest.is_file() and column not in outputs:
        raise VitportError(
            f"{directory} has no '{column}' column (it holds {', '.join(outputs)}); "
            f"compare another with column=..., or embed with outputs={column}",
            params=("column=...", "outputs="),
        )
    data = read(directory, arrays=True, columns=["id", column])
    if not data["id"]:
        return [], np.zeros((0, 1), np.float32)
    vectors = data[column].reshape(len(data["id"]), -1).astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return data["id"], vectors / np.maximum(norms, 1e-12)


def _pairs_torch(
    vectors: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upper-triangle tiles of X X^T, BLOCK x BLOCK at a time."""
    x = torch.from_numpy(vectors)
    rows, cols, sims = [], [], []
    n = len(x)
    for i in range(0, n, BLOCK):
        for j in range(i, n, BLOCK):
            tile = x[i : i + BLOCK] @ x[j : j + BLOCK].T
            r, c = torch.nonzero(tile >= threshold, as_tuple=True)
            r, c = r + i, c + j
            keep = r < c
            rows.append(r[keep].numpy())
            cols.append(c[keep].numpy())
            sims.append(tile[r[keep] - i, c[keep] - j].numpy())
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims)


def _pairs_faiss(vectors: np.ndarray, threshold: float):
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    # range_search keeps similarities above the radius; the tiles keep those at or above it
    lims, sims, found = index.range_search(vectors, np.nextafter(threshold, -np.inf))
    rows = np.repeat(np.arange(len(vectors)), np.diff(lims).astype(np.int64))
    keep = (rows < found) & (sims >= threshold)
    return rows[keep], found[keep], sims[keep]


def near_duplicates(
    directory: str | Path, threshold: float = 0.95, column: str = "pooled", method: str = "auto"
) -> Pairs:
    """Every pair (a, b), a before b in the directory's order, with cosine >= threshold."""
    ids, vectors = _normalised(Path(directory), column)
    if method == "auto":
        try:
            import faiss  # noqa: F401

            method = "faiss"
        except ImportError:
            method = "torch"
    find = _pairs_faiss if method == "faiss" else _pairs_torch
    if len(ids) < 2:
        return Pairs([], [], np.zeros(0, np.float32), method, threshold, len(ids))
    rows, cols, sims = find(vectors, threshold)
    order = np.lexsort((cols, rows))
    return Pairs(
        [ids[i] for i in rows[order]],
        [ids[j] for j in cols[order]],
        sims[order].astype(np.float32),
        method,
        threshold,
        len(ids),
    )


PAIR_COLUMNS = ["id_a", "id_b", "cosine"]


def is_pairs_file(path: Path) -> bool:
    """A pairs file `write_pairs` wrote (a Parquet file of exactly its columns)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).names == PAIR_COLUMNS
    except Exception:  # noqa: BLE001 - not Parquet at all
        return False


def write_pairs(pairs: Pairs, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id_a": pa.array(pairs.a, pa.string()),
            "id_b": pa.array(pairs.b, pa.string()),
            "cosine": pa.array(pairs.cosine, pa.float32()),
        }
    )
    try:
        write_atomic(path, lambda tmp: pq.write_table(table, tmp))
    except OSError as exc:
        raise VitportError(f"could not write {path}: {exc.strerror or exc}") from exc
