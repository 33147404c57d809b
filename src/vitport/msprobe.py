"""msprobe dumps: a second reader and writer beside golden.py.

Read: a `task: tensor` dump at level L0 or mix (``dump.json``, ``construct.json``,
``dump_tensor_data/*.pt``) becomes the reference of compare: its first module's input gives the
pixel batches, its block and part records give the states localisation teacher-forces on, and
its final-norm output gives the reference tokens. Write: `dump` records every module call of an
Encoder's forward in msprobe's layout and field names, so that `msprobe compare` reads it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vitport.device import dtype_name, parse_dtype
from vitport.errors import GoldenMismatchError, VitportError
from vitport.format import count
from vitport.golden import EMBEDDINGS, SOURCE
from vitport.hooks import hooked, replace_first_tensor
from vitport.inputs import PixelInputs

if TYPE_CHECKING:
    from vitport.encoder import Encoder, Features

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

    def bind(self, encoder: Encoder, check_weights: bool = True) -> DumpBlocks:
        return bind(self, encoder, check_weights)


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


# --- binding a dump to an Encoder --------------------------------------------------------------


@dataclass
class DumpBlocks:
    """A dump's block states, bound to an Encoder's hook points: the interface of GoldenBlocks
    (points, images, dtype, read), plus each block's parts where the dump has them."""

    dump: Dump
    points: list[str]  # EMBEDDINGS, then the Encoder's block names
    images: list[str]
    dtype: str
    path: str
    prefix: tuple[str, str]  # (the dump's path prefix, the Encoder's) that map one onto the other
    final: str | None  # the Encoder's name of the final norm, where the dump holds its output
    parts: dict[int, dict[str, str]] = field(default_factory=dict)  # block -> kind -> name
    sizes: list[int] = field(default_factory=list)  # rows of each forward call

    def dump_path(self, name: str) -> str:
        theirs, mine = self.prefix
        return theirs + name[len(mine) :]

    def rows(self, name: str, which: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of module `name`'s input or output, over all its calls."""
        pieces, offset = [], 0
        for call, size in zip(self.dump.calls[self.dump_path(name)], self.sizes, strict=True):
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                record = call.input() if which == "input" else call.output()
                pieces.append(self.dump.tensor(record)[lo - offset : hi - offset])
            offset += size
        return torch.cat(pieces)

    def read(self, point: str, start: int, stop: int) -> torch.Tensor:
        if point == EMBEDDINGS:
            return self.rows(self.points[1], "input", start, stop)
        return self.rows(point, "output", start, stop)

    def tokens(self, start: int, stop: int) -> torch.Tensor:
        """The reference tokens: the final norm's output, or the last block's."""
        return self.rows(self.final or self.points[-1], "output", start, stop)


def bind(dump: Dump, encoder: Encoder, check_weights: bool = True) -> DumpBlocks:
    """Map the dump's modules onto the Encoder's, refusing a dump of another model with the
    first difference: the block class, the block count, the names, the hidden size, the weights."""
    names = {id(m): n for n, m in encoder.module.named_modules()}
    mine = [names[id(b)] for b in encoder.blocks]
    cls = type(encoder.blocks[0]).__name__
    theirs = [p for p in dump.order if dump.calls[p][0].cls == cls]
    if not theirs:
        found = sorted({dump.calls[p][0].cls for p in dump.order})
        raise GoldenMismatchError(
            f"the msprobe dump has no {cls} modules, the blocks of {encoder.spec} (its modules: "
            f"{', '.join(found[:6])}); dump the same model"
        )
    if len(theirs) != len(mine):
        raise GoldenMismatchError(
            f"the msprobe dump has {len(theirs)} {cls} blocks, {encoder.spec} has {len(mine)}; "
            "dump the same model"
        )
    if theirs[0].endswith(mine[0]):
        prefix = (theirs[0][: len(theirs[0]) - len(mine[0])], "")
    elif mine[0].endswith(theirs[0]):
        prefix = ("", mine[0][: len(mine[0]) - len(theirs[0])])
    else:
        prefix = ("", "")
    for dumped, own in zip(theirs, mine, strict=True):
        if prefix[0] + own[len(prefix[1]) :] != dumped:
            raise GoldenMismatchError(
                f"the msprobe dump's block {dumped} is {own} in {encoder.spec}: the module names "
                "differ; dump the same model"
            )
    batches = len(dump.calls[theirs[0]])
    first_out = dump.calls[theirs[0]][0].output() or {}
    hidden = (first_out.get("shape") or [0])[-1]
    if hidden != encoder.arch.hidden_size:
        raise GoldenMismatchError(
            f"the msprobe dump's blocks are {hidden} wide, {encoder.spec} has hidden size "
            f"{encoder.arch.hidden_size}; dump the same model"
        )
    pixels = dump.calls[dump.order[0]]
    sizes = [int((c.input() or {}).get("shape", [0])[0]) for c in pixels]
    if len(sizes) != batches:
        raise VitportError(
            f"the msprobe dump holds {len(sizes)} calls of its first module but {batches} of its "
            "blocks; dump whole forward calls"
        )
    dtype = dtype_name(parse_dtype(str(first_out.get("dtype", "torch.float32"))))
    blocks = DumpBlocks(
        dump,
        [EMBEDDINGS, *mine],
        dump.pixel_inputs().names,
        dtype,
        str(dump.folder),
        prefix,
        None,
        sizes=sizes,
    )
    final = names[id(encoder.final_norm)] if encoder.final_norm is not None else None
    if final is not None and len(dump.calls.get(blocks.dump_path(final), [])) == batches:
        blocks.final = final
    for index in range(len(mine)):
        found = {kind: names[id(m)] for kind, m in encoder.block_parts(index).items()}
        found = {
            k: n
            for k, n in found.items()
            if len(dump.calls.get(blocks.dump_path(n), [])) == batches
        }
        if found:
            blocks.parts[index] = found
    if check_weights:
        _check_weights(blocks, encoder)
    return blocks


def _check_weights(blocks: DumpBlocks, encoder: Encoder, limit: int = 4) -> None:
    """The first parameters the dump recorded equal the Encoder's, in the dump's dtype."""
    theirs_prefix, mine_prefix = blocks.prefix
    modules = dict(encoder.module.named_modules())
    checked = 0
    for path in blocks.dump.order:
        params = blocks.dump.calls[path][0].record.get("parameters") or {}
        name = mine_prefix + path[len(theirs_prefix) :]
        if not path.startswith(theirs_prefix) or name not in modules:
            continue
        for param, record in params.items():
            own = getattr(modules[name], param, None)
            if not isinstance(record, dict) or "data_name" not in record:
                continue
            if not isinstance(own, torch.Tensor):
                continue
            dumped = blocks.dump.tensor(record).float()
            local = own.detach().to("cpu", blocks.dump.tensor(record).dtype).float()
            if dumped.shape != local.shape:
                raise GoldenMismatchError(
                    f"the msprobe dump's {path}.{param} is {list(dumped.shape)}, {encoder.spec}'s "
                    f"is {list(local.shape)}; dump the same model"
                )
            scale = float(local.abs().max()) if local.numel() else 0.0
            diff = float((dumped - local).abs().max()) if local.numel() else 0.0
            if diff > 1e-2 * scale + 1e-6:
                raise GoldenMismatchError(
                    f"the msprobe dump's {path}.{param} differs from {encoder.spec}'s by up to "
                    f"{diff:.3g} (of {scale:.3g}): other weights; dump the same checkpoint"
                )
            checked += 1
            if checked >= limit:
                return


def reference_features(blocks: DumpBlocks, base: Encoder) -> Features:
    """The dump's outputs as Features: its tokens put in place of the base model's own at the
    final norm (or the last block), so pooled and logits follow from them as the family computes
    them. Marked as a dump, with its dtype."""
    inputs = blocks.dump.pixel_inputs()
    point = base.final_norm if blocks.final else base.blocks[-1]
    parts, start = [], 0
    for pixels in inputs.batches:
        stop = start + len(pixels)
        tokens = blocks.tokens(start, stop).to(base.device.torch_device, base.dtype)

        def put(_m: nn.Module, _args: tuple, _kwargs: dict, output: Any, tokens=tokens) -> Any:
            return replace_first_tensor(output, tokens)

        with hooked([(point, put)]), torch.inference_mode():
            raw = base.forward_fn(base.module, pixels.to(base.device.torch_device, base.dtype))
        parts.append(
            base.split(raw, pixels.shape[-2:], inputs.names[start:stop]).to("cpu", torch.float32)
        )
        start = stop
    from vitport.encoder import Features

    features = Features.concat(parts)
    features.meta.update(
        format=FORMAT,
        device=f"msprobe dump ({blocks.dump.level})",
        dtype=blocks.dtype,
        device_description={
            "source": "msprobe dump",
            "level": blocks.dump.level,
            "path": str(blocks.dump.folder),
        },
    )
    features.meta[SOURCE] = str(blocks.dump.folder)
    return features


def is_dump_reference(reference: Features) -> bool:
    return reference.meta.get("format") == FORMAT


# --- writing a dump that msprobe reads ---------------------------------------------------------


def _stats(tensor: torch.Tensor, data_name: str | None) -> dict[str, Any]:
    values = tensor.detach().float()
    empty = values.numel() == 0
    record: dict[str, Any] = {
        "type": "torch.Tensor",
        "dtype": str(tensor.dtype),
        "shape": list(tensor.shape),
        "Max": None if empty else float(values.max()),
        "Min": None if empty else float(values.min()),
        "Mean": None if empty else float(values.mean()),
        "Norm": None if empty else float(values.norm()),
        "requires_grad": bool(tensor.requires_grad),
    }
    for key in ("Max", "Min", "Mean", "Norm"):
        if record[key] is not None and not math.isfinite(record[key]):
            record[key] = str(record[key])  # msprobe writes inf/nan as text
    if data_name is not None:
        record["data_name"] = data_name
    return record


class _Recorder:
    """Records every module call of forwards, as msprobe's L0 dump does."""

    def __init__(self, encoder: Encoder, folder: Path) -> None:
        self.encoder = encoder
        self.tensors = folder / TENSOR_DIR
        self.data: dict[str, Any] = {}
        self.construct: dict[str, str | None] = {}
        self.calls: dict[str, int] = {}
        self.stack: list[str] = []
        self.pending: dict[int, list[tuple[str, tuple, dict]]] = {}
        self.names = {id(m): n for n, m in encoder.module.named_modules() if n}

    def _save(self, tensor: torch.Tensor, name: str) -> dict[str, Any]:
        torch.save(tensor.detach().to("cpu").clone(), self.tensors / name)
        return _stats(tensor, name)

    def _field(self, value: Any, stem: str) -> Any:
        if isinstance(value, torch.Tensor):
            return self._save(value, f"{stem}.pt")
        if isinstance(value, (tuple, list)):
            return [self._field(v, f"{stem}.{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self._field(v, f"{stem}.{k}") for k, v in value.items()}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value if value is None else {"type": type(value).__name__, "value": value}
        return None

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        name = self.names[id(module)]
        head = f"{MODULE}{name}.{type(module).__name__}{FORWARD[:-1]}"
        index = self.calls.get(head, 0)
        self.calls[head] = index + 1
        key = f"{head}.{index}"
        self.construct[key] = self.stack[-1] if self.stack else None
        self.stack.append(key)
        self.pending.setdefault(id(module), []).append((key, args, kwargs))

    def after(self, module: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> None:
        key, args, kwargs = self.pending[id(module)].pop()
        self.stack.pop()
        record: dict[str, Any] = {
            "input_args": [self._field(a, f"{key}.input.{i}") for i, a in enumerate(args)],
            "input_kwargs": {k: self._field(v, f"{key}.input.{k}") for k, v in kwargs.items()},
            "output": self._field(
                output if isinstance(output, (tuple, list)) else [output], f"{key}.output"
            ),
        }
        if key.endswith(".forward.0"):  # parameters once per module, not once per call
            params = dict(module.named_parameters(recurse=False))
            record["parameters"] = {
                p: self._save(t, f"{key}.parameters.{p}.pt") for p, t in params.items()
            }
        else:
            record["parameters"] = {}
        self.data[key] = record


def write_dump(encoder: Encoder, pixel_batches: Iterable[torch.Tensor], folder: str | Path) -> Path:
    """Every module call of the forwards over `pixel_batches`, as an msprobe L0 tensor dump
    under `folder` (`step0/rank0/`); returns the folder holding dump.json."""
    from vitport.outputs import write_atomic

    folder = Path(folder)

    def write(tmp: Path) -> None:
        rank = tmp / "step0" / "rank0"
        (rank / TENSOR_DIR).mkdir(parents=True)
        recorder = _Recorder(encoder, rank)
        modules = [m for m in encoder.module.modules() if id(m) in recorder.names]
        with (
            hooked([(m, recorder.after) for m in modules], [(m, recorder.before) for m in modules]),
            torch.inference_mode(),
        ):
            for pixels in pixel_batches:
                encoder.forward_fn(
                    encoder.module, pixels.to(encoder.device.torch_device, encoder.dtype)
                )
        dump = {
            "task": "tensor",
            "level": "L0",
            "framework": "pytorch",
            "dump_data_dir": str(folder / "step0" / "rank0" / TENSOR_DIR),
            "data": recorder.data,
        }
        (rank / DUMP_JSON).write_text(json.dumps(dump, indent=1))
        (rank / CONSTRUCT_JSON).write_text(json.dumps(recorder.construct, indent=1))
        (rank / STACK_JSON).write_text("{}")

    try:
        write_atomic(folder, write)
    except OSError as exc:
        raise VitportError(f"could not write the dump to {folder}: {exc.strerror or exc}") from exc
    return folder / "step0" / "rank0"
