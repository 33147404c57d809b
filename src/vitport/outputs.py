"""Where commands write: checked before any work, and never over what vitport did not write."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from vitport.errors import VitportError

T = TypeVar("T")


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


def _refuse_existing(path: Path, option: str, ours: Callable[[Path], bool], kind: str) -> None:
    """An existing output is never replaced without `overwrite`, whoever wrote it: vitport's
    own golden file or report is as much the user's as any other file."""
    named = (f"{option}=", "overwrite=True")
    if ours(path):
        raise OutputError(
            f"{option}={path} already holds vitport's output from an earlier run; pass "
            "overwrite=True to replace it, or choose another path",
            params=named,
        )
    if kind == "directory":
        raise OutputError(
            f"{option}={path} holds files vitport did not write; choose a new or empty "
            "directory, or pass overwrite=True",
            params=named,
        )
    raise OutputError(
        f"{option}={path} exists and was not written by vitport; pass overwrite=True to "
        "replace it, or choose another path",
        params=named,
    )


def check_file(
    path: Path | None,
    option: str,
    overwrite: bool = False,
    ours: Callable[[Path], bool] = lambda _p: False,
) -> None:
    """Before the work: `path` can be written, and does not exist yet or `overwrite` says to
    replace it. `ours` recognises vitport's own output, to say so in the refusal. `option`
    names the parameter `path` came from."""
    if path is None:
        return
    named = (f"{option}=",)
    if path.is_dir():
        raise OutputError(f"{option}={path} is a directory; give a file name", params=named)
    if path.exists():
        if not os.access(path, os.W_OK):
            raise OutputError(f"cannot write {option}={path}: the file is read-only", params=named)
        if not overwrite:
            _refuse_existing(path, option, ours, "file")
    _writable_parent(path)


def check_dir(
    path: Path,
    option: str,
    overwrite: bool = False,
    ours: Callable[[Path], bool] = lambda _p: False,
) -> None:
    """Before the work: directory `path` can be written into, and is new or empty, or
    `overwrite` says to write into it anyway. `ours` recognises vitport's own output, to say
    so in the refusal. `option` names the parameter `path` came from."""
    named = (f"{option}=",)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option}={path} is a file; give a directory", params=named)
    if path.is_dir():
        if any(path.iterdir()) and not overwrite:
            _refuse_existing(path, option, ours, "directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(
                f"cannot write into {option}={path}: it is not writable", params=named
            )
        return
    _writable_parent(path)


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: beside it (same file system),
    hidden, and named after this host and process, so concurrent writers never share one."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def write_atomic(path: Path, write: Callable[[Path], T], *, replace: bool = True) -> T:
    """Write file or directory `path` all at once and return what `write` returns: `write`
    fills a temporary path beside it, which is then renamed onto `path`, so a reader sees the
    old one or the new one, never half of one. Whatever a new directory replaces is moved aside
    first and removed once the new one is in place; with `replace=False` an existing non-empty
    directory is kept (a concurrent writer finished first) and the rename raises OSError.
    What is written gets the modes of the user's umask, whatever the temporary path had.
    The temporary path never outlives the call; errors stay OSError, for each caller to word."""
    tmp = temp_path(path)
    aside = tmp.with_name(f"{tmp.name}-replaced")
    _remove(tmp)  # left by a killed run whose process id this one now has
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        result = write(tmp)
        _ordinary_modes(tmp)
        if replace and tmp.is_dir() and path.exists():  # a directory is not renamed over one
            os.replace(path, aside)
        os.replace(tmp, path)
        return result
    finally:
        _remove(tmp)
        _remove(aside)


def umask() -> int:
    """This process's umask, read without changing it where Linux shows it (os.umask would
    set it for a moment, under every other thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _ordinary_modes(path: Path) -> None:
    """Give `path`, and all it holds, the mode any file the user writes gets: 0666 (0777 for
    a directory or an executable) less the umask. Temporary files and directories are made
    owner-only (mkstemp, mkdtemp, safetensors), and that must not leak into the output."""
    if not path.exists() or path.is_symlink():
        return
    mask = umask()
    paths = [path]
    if path.is_dir():
        paths += [p for p in path.rglob("*") if not p.is_symlink()]
    for each in paths:
        wide = each.is_dir() or each.stat().st_mode & 0o111
        each.chmod((0o777 if wide else 0o666) & ~mask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write after the work: one line, exit code 2, when it fails anyway (disk full, ...)."""
    try:
        write_atomic(path, lambda tmp: tmp.write_text(text))
    except OSError as exc:
        raise OutputError(f"could not write {path}: {exc.strerror or exc}") from exc


def check_size(what: str, size: int, max_bytes: int, estimated: bool = False) -> None:
    """Refuse, before anything is written, an output of `size` bytes beyond `max_bytes`."""
    if size > max_bytes:
        about = "about " if estimated else ""
        raise OutputError(
            f"{what} would take {about}{size / 1e6:,.1f} MB, over max_bytes={max_bytes} "
            f"({max_bytes / 1e6:,.1f} MB); lower block_images or raise max_bytes",
            params=("max_bytes=", "block_images", "max_bytes"),
        )
