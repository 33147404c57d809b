"""Reading an msprobe dump: a `task: tensor` dump at level L0 or mix (``dump.json``,
``construct.json``, ``dump_tensor_data/*.pt``) opened and checked, its module calls by path;
tensors stay on disk until read."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from vitport.errors import VitportError
from vitport.format import count
from vitport.inputs import PixelInputs

DUMP_JSON = "dump.json"
CONSTRUCT_JSON = "construct.json"
STACK_JSON = "stack.json"
TENSOR_DIR = "dump_tensor_data"
FORMAT = "msprobe"  # the meta entry "format" of a reference read from a dump
MODULE = "Module."
FORWARD = ".forward."


@dataclass(frozen=True)
class Call:
    """One module call recorded in a dump: `Module.<path>.<cls>.forward.<index>`."""

    key: str
    path: str
    cls: str
    index: int
    record: dict[str, Any]

    def input(self) -> dict[str, Any] | None:
        args = self.record.get("input_args") or []
        return args[0] if args and isinstance(args[0], dict) else None

    def output(self) -> dict[str, Any] | None:
        return _first_record(self.record.get("output"))


def parse_key(key: str) -> tuple[str, str, int] | None:
    """(module path, class name, call index) of a module record's key; None for an API call."""
    if not key.startswith(MODULE):
        return None
    head, sep, index = key.rpartition(FORWARD)
    if not sep or not index.isdigit():
        return None
    path, _, cls = head[len(MODULE) :].rpartition(".")
    return path, cls, int(index)


def _first_record(value: Any) -> dict[str, Any] | None:
    """The first tensor record in a (nested) input or output field."""
    if isinstance(value, dict):
        if value.get("type") == "torch.Tensor":
            return value
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            found = _first_record(item)
            if found is not None:
                return found
    return None


def _data_names(value: Any) -> Iterable[str]:
    if isinstance(value, dict):
        if "data_name" in value and isinstance(value["data_name"], str):
            yield value["data_name"]
        for item in value.values():
            yield from _data_names(item)
    elif isinstance(value, list):
        for item in value:
            yield from _data_names(item)


@lru_cache(maxsize=8)
def _load(path: str) -> torch.Tensor:
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a broken pickle raises many types
        raise VitportError(
            f"tensor file {path} of the msprobe dump cannot be read ({exc}); dump again"
        ) from exc
    if not isinstance(tensor, torch.Tensor):
        raise VitportError(f"{path} of the msprobe dump holds no tensor; dump again")
    return tensor


@dataclass
class Dump:
    """An msprobe tensor dump, opened and checked; tensors stay on disk until read."""

    folder: Path
    level: str
    calls: dict[str, list[Call]]  # module path -> its calls, by index
    order: list[str]  # module paths in the order their first call ends

    def tensor(self, record: dict[str, Any]) -> torch.Tensor:
        return _load(str(self.folder / TENSOR_DIR / record["data_name"]))

    def pixel_inputs(self) -> PixelInputs:
        """The pixel batches that went in: the first module's input, one batch per call."""
        first = self.order[0]
        batches = []
        for call in self.calls[first]:
            record = call.input()
            if record is None or len(record.get("shape", [])) != 4:
                raise VitportError(
                    f"the msprobe dump's first module {first} does not take an image batch "
                    f"(input {record and record.get('shape')}); dump the whole model's forward"
                )
            batches.append(self.tensor(record))
        names = [f"forward.{k}[{i}]" for k, b in enumerate(batches) for i in range(len(b))]
        return PixelInputs(names, batches)


def find_dump_json(path: Path) -> Path:
    """The folder holding dump.json: `path` itself, or the one step*/rank*/proc* below it."""
    if not path.exists():
        raise VitportError(f"msprobe dump {path} not found; give msprobe's dump_path")
    if (path / DUMP_JSON).is_file():
        return path
    found = sorted(
        {p.parent for pattern in ("*/dump.json", "*/*/dump.json") for p in path.glob(pattern)}
    )
    if not found:
        raise VitportError(
            f"no {DUMP_JSON} under {path}; give msprobe's dump_path, a step*/ folder or a "
            "rank*/proc*/ folder"
        )
    if len(found) > 1:
        listing = ", ".join(str(p.relative_to(path)) for p in found[:3])
        raise VitportError(
            f"{path} holds {count(len(found), 'dump')} ({listing}{', ...' if len(found) > 3 else ''}); "
            "give one of those folders"
        )
    return found[0]


def is_dump(path: str | Path) -> bool:
    """A folder that holds (or is above) an msprobe dump.json."""
    path = Path(path)
    return path.is_dir() and (
        (path / DUMP_JSON).is_file()
        or any(path.glob("*/dump.json"))
        or any(path.glob("*/*/dump.json"))
    )


def open_dump(path: str | Path) -> Dump:
    """Open and check an msprobe dump; one line with the cure for what cannot work."""
    folder = find_dump_json(Path(path))
    where = folder / DUMP_JSON
    try:
        data = json.loads(where.read_text())
    except json.JSONDecodeError as exc:
        raise VitportError(
            f"{where} is cut short or is not JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}); dump again and let the run reach debugger.stop() and debugger.step()"
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
        raise VitportError(f"{where} has no 'data' records; it is not an msprobe dump")
    if data.get("framework", "pytorch") != "pytorch":
        raise VitportError(
            f"{where} is a {data.get('framework')} dump; vitport reads PyTorch dumps "
            "(msprobe.pytorch.PrecisionDebugger)"
        )
    task, level = data.get("task"), str(data.get("level"))
    if task != "tensor":
        raise VitportError(
            f"{where} is a '{task}' dump: it holds statistics, no tensors; dump with "
            '"task": "tensor" (data_mode ["all"])'
        )
    calls: dict[str, list[Call]] = {}
    order: list[str] = []
    for key, record in data["data"].items():
        parsed = parse_key(key)
        if parsed is None or not isinstance(record, dict):
            continue
        path_, cls, index = parsed
        if path_ not in calls:
            calls[path_], _ = [], order.append(path_)
        calls[path_].append(Call(key, path_, cls, index, record))
    if not calls:
        raise VitportError(
            f"{where} records API calls only (level {level}), no modules; dump at level L0 or mix"
        )
    for path_ in calls:
        calls[path_].sort(key=lambda c: c.index)
    names = [n for c in calls.values() for call in c for n in _data_names(call.record)]
    on_disk = set(os.listdir(folder / TENSOR_DIR)) if (folder / TENSOR_DIR).is_dir() else set()
    missing = [n for n in names if n not in on_disk]
    if missing:
        raise VitportError(
            f"{len(missing)} of the {len(names)} tensor files that {where.name} names are missing "
            f"from {folder / TENSOR_DIR} (first: {missing[0]}); copy the whole dump folder"
        )
    return Dump(folder, level, calls, order)
