"""Where commands write: checked before any work, and never over what vitport did not write."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from vitport.errors import VitportError


class OutputError(VitportError):
    """An output path cannot or must not be written (exit code 2)."""


def is_features_file(path: Path) -> bool:
    """A golden Features file written by vitport."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("vitport_features") == "1"
    except Exception:  # not safetensors at all
        return False


def is_vitport_json(path: Path) -> bool:
    """A JSON record written by vitport (it carries a schema or vitport version)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and bool({"schema_version", "vitport_version"} & set(data))


def first_line_is(line: str) -> Callable[[Path], bool]:
    """A text output vitport wrote, recognised by its first line (a CSV header, say)."""

    def ours(path: Path) -> bool:
        try:
            with path.open(encoding="utf-8") as f:
                return f.readline().rstrip("\n") == line
        except (OSError, UnicodeDecodeError):
            return False

    return ours


def is_report_dir(path: Path) -> bool:
    return is_vitport_json(path / "report.json")


def _writable_parent(path: Path) -> None:
    probe = path.parent if str(path.parent) else Path(".")
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot write {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: {probe} is not writable; choose another path")


def check_file(
    path: Path | None,
    option: str,
    overwrite: bool = False,
    ours: Callable[[Path], bool] = lambda _p: False,
) -> None:
    """Before the work: `path` can be written, and an existing file there is vitport's own
    (`ours`) or `overwrite` says to replace it."""
    if path is None:
        return
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory; give a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise OutputError(f"cannot write {option} {path}: the file is read-only")
        if not overwrite and not ours(path):
            raise OutputError(
                f"{option} {path} exists and was not written by vitport; pass --overwrite to "
                "replace it, or choose another path"
            )
    _writable_parent(path)


def check_dir(path: Path, option: str, overwrite: bool, ours: Callable[[Path], bool]) -> None:
    """Before the work: directory `path` can be written into, and is new, empty, vitport's own
    (`ours`), or `overwrite` says to write into it anyway."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file; give a directory")
    if path.is_dir():
        if any(path.iterdir()) and not overwrite and not ours(path):
            raise OutputError(
                f"{option} {path} holds files vitport did not write; choose a new or empty "
                "directory, or pass --overwrite"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write into {option} {path}: it is not writable")
        return
    _writable_parent(path)


def write_text(path: Path, text: str) -> None:
    """Write after the work: one line, exit code 2, when it fails anyway (disk full, ...)."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"could not write {path}: {exc.strerror or exc}") from exc
