"""What `embed` reads: files, directories (recursive), `@list.txt` files of paths, or Parquet
files with a path or image-bytes column. Every input gets a stable, unique id."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from vitport.errors import ImageError, VitportError
from vitport.inputs import ImageProblem, directory_files, not_an_image, nothing_to_read
from vitport.inputs.stream import Input


def _parquet_inputs(path: Path, column: str | None) -> list[Input]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise VitportError(f"{path} is not a readable Parquet file ({exc})") from exc
    if column is None:
        binary = [f.name for f in schema if _holds_bytes(f.type, pa)]
        column = "path" if "path" in schema.names else (binary[0] if binary else None)
        if column is None:
            raise VitportError(
                f"{path} has no 'path' column and no image-bytes column; name one with "
                f"column=... (columns: {', '.join(schema.names)})",
                params=("column=...",),
            )
    if column not in schema.names:
        raise VitportError(f"{path} has no column '{column}' (columns: {', '.join(schema.names)})")
    rows = pq.ParquetFile(path).metadata.num_rows
    if _holds_bytes(schema.field(column).type, pa):
        return [Input(f"{path.name}:{row}", str(path), row, column) for row in range(rows)]
    values = pq.read_table(path, columns=[column]).column(0).to_pylist()
    root = path.parent
    return [
        Input(f"{path.name}:{row}", str(root / value) if value else "")
        for row, value in enumerate(values)
    ]


def _holds_bytes(kind, pa) -> bool:
    """A binary column, or a struct with a `bytes` field (how Hugging Face datasets store images)."""
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return pa.types.is_struct(kind) and any(
        kind.field(i).name == "bytes" for i in range(kind.num_fields)
    )


def _list_inputs(path: Path) -> list[Input]:
    """One path per line, relative to the list's own directory; blank lines and # comments
    skipped; the id is the line as written."""
    if not path.is_file():
        raise VitportError(f"list file {path} not found")
    inputs = []
    for line in path.read_text().splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            inputs.append(Input(entry, str(path.parent / entry)))
    return inputs


def _tree_inputs(root: Path) -> list[Input]:
    """A file, or a directory's files: images to read, other files failing as not-an-image."""
    if not root.is_dir():
        return [Input(root.name, str(root))]
    images, others = directory_files(root)
    skipped = {path: not_an_image(path) for path in others}

    def entry(path: Path) -> Input:
        name, why = path.relative_to(root).as_posix(), skipped.get(path)
        if why is None:
            return Input(name, str(path))
        return Input(name, str(path), problem=why.reason, problem_category=why.category)

    return [entry(p) for p in sorted([*images, *others], key=lambda p: p.relative_to(root).parts)]


def collect(sources: Sequence[str], column: str | None = None) -> list[Input]:
    """Every input, in a stable order, each with an id unique in the run.

    A file's id is its name, a directory's files are named relative to it, a list's entries as
    written, a Parquet row as ``FILE:ROW``. Two inputs with one id are refused, naming both."""
    if not sources:
        raise ImageError("no SOURCE given: pass image files, directories, @list.txt or .parquet")
    inputs: list[Input] = []
    for source in sources:
        if source.startswith("@"):
            inputs.extend(_list_inputs(Path(source[1:]).expanduser()))
            continue
        path = Path(source).expanduser()
        if path.suffix == ".parquet" and path.is_file():
            inputs.extend(_parquet_inputs(path, column))
        elif path.exists():
            inputs.extend(_tree_inputs(path))
        else:
            raise ImageError(f"SOURCE {source} not found")
    seen: dict[str, str] = {}
    for item in inputs:
        if item.id in seen:
            raise VitportError(
                f"two inputs have the id '{item.id}' ({seen[item.id]} and {item.path}); "
                "pass their common parent directory instead, or embed them in separate runs"
            )
        seen[item.id] = item.path
    if all(item.problem for item in inputs):
        raise nothing_to_read(
            sources,
            [ImageProblem(item.path, item.problem, item.problem_category) for item in inputs],
        )
    return inputs


def fingerprint(inputs: Sequence[Input]) -> str:
    """A hash of the ordered ids and where each is read from: a resumed run must see exactly
    the same inputs (another folder with the same file names is another set)."""
    digest = hashlib.sha256()
    for item in inputs:
        where = str(Path(item.path).resolve()) if item.path else ""
        digest.update(f"{item.id}\0{where}\0{item.row}\0{item.column}\0".encode())
    return digest.hexdigest()
