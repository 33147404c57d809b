"""Writing a dump that msprobe reads: every module call of an Encoder's forward, in msprobe's
layout and field names, so that `msprobe compare` reads it."""

from __future__ import annotations

import functools
import json
import math
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vitport.errors import VitportError
from vitport.format import count
from vitport.hooks import hooked
from vitport.outputs import check_size

if TYPE_CHECKING:
    from vitport.encoder import Encoder

from vitport.msprobe.read import (
    CONSTRUCT_JSON,
    DUMP_JSON,
    FORWARD,
    MODULE,
    STACK_JSON,
    TENSOR_DIR,
)

TYPICAL = -0.12345678901234567  # a statistic as long as most are written, where only sizes count


def _stats(tensor: torch.Tensor, data_name: str | None, measure: bool = True) -> dict[str, Any]:
    values = tensor.detach().float() if measure else tensor
    empty = values.numel() == 0
    record: dict[str, Any] = {
        "type": "torch.Tensor",
        "dtype": str(tensor.dtype),
        "shape": list(tensor.shape),
        "Max": None if empty else float(values.max()) if measure else TYPICAL,
        "Min": None if empty else float(values.min()) if measure else TYPICAL,
        "Mean": None if empty else float(values.mean()) if measure else TYPICAL,
        "Norm": None if empty else float(values.norm()) if measure else TYPICAL,
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

    def __init__(self, encoder: Encoder, folder: Path, sizes: list | None = None) -> None:
        self.encoder = encoder
        self.tensors = folder / TENSOR_DIR
        self.sizes = sizes  # when a list: each tensor's file name and bytes, and nothing saved
        self.data: dict[str, Any] = {}
        self.construct: dict[str, str | None] = {}
        self.calls: dict[str, int] = {}
        self.stack: list[str] = []
        self.pending: dict[int, list[tuple[str, tuple, dict]]] = {}
        self.names = {id(m): n for n, m in encoder.module.named_modules() if n}

    def _save(self, tensor: torch.Tensor, name: str) -> dict[str, Any]:
        if self.sizes is None:
            torch.save(tensor.detach().to("cpu").clone(), self.tensors / name)
        else:
            self.sizes.append((name, tensor.numel() * tensor.element_size()))
        return _stats(tensor, name, measure=self.sizes is None)

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


def _record(recorder: _Recorder, pixel_batches: Iterable[torch.Tensor]) -> None:
    encoder = recorder.encoder
    modules = [m for m in encoder.module.modules() if id(m) in recorder.names]
    with (
        hooked([(m, recorder.after) for m in modules], [(m, recorder.before) for m in modules]),
        torch.inference_mode(),
    ):
        for pixels in pixel_batches:
            encoder.forward_fn(
                encoder.module, pixels.to(encoder.device.torch_device, encoder.dtype)
            )


@functools.cache
def _file_overhead() -> tuple[int, float]:
    """What torch.save adds to a tensor's bytes in a file: a fixed part, and a part per
    character of the file's name (its zip entries are named after it); measured once here."""
    with tempfile.TemporaryDirectory() as scratch:
        short, long = Path(scratch) / "a.pt", Path(scratch) / f"{'a' * 101}.pt"
        for path in (short, long):
            torch.save(torch.zeros(0), path)
        per_char = (long.stat().st_size - short.stat().st_size) / 100
        return round(short.stat().st_size - per_char), per_char


def _one_forward(encoder: Encoder, batch: int) -> tuple[int, int]:
    """The bytes the parameters take in a dump, and those of everything else, for one forward
    of `batch` images."""
    from PIL import Image

    sizes: list[tuple[str, int]] = []
    recorder = _Recorder(encoder, Path("."), sizes)
    h, w = encoder.image_size
    _record(recorder, [encoder.preprocess([Image.new("RGB", (w, h))] * batch)])
    fixed, per_char = _file_overhead()
    params = rest = 0
    for name, size in sizes:
        on_disk = size + fixed + round(per_char * len(Path(name).stem))
        if ".parameters." in name:
            params += on_disk
        else:
            rest += on_disk
    rest += len(json.dumps({"data": recorder.data}, indent=1))
    rest += len(json.dumps(recorder.construct, indent=1))
    return params, rest


def dump_bytes(encoder: Encoder, batches: Sequence[int]) -> int:
    """About how many bytes an msprobe dump of forwards of `batches` images each takes on disk,
    measured by recording (not saving) one forward of 1 and one of 2 blank images: the
    parameters are saved once, every other tensor at every call."""
    params, one = _one_forward(encoder, 1)
    _, two = _one_forward(encoder, 2)
    per_image = max(two - one, 0)
    return params + sum(one + per_image * (batch - 1) for batch in batches)


def check_dump_size(encoder: Encoder, images: int, batch_size: int, max_bytes: int) -> int:
    """The estimated size of a dump of `images` images in batches of `batch_size`; refused,
    with the estimate, beyond `max_bytes`, before anything is written."""
    full, last = divmod(images, batch_size)
    size = dump_bytes(encoder, [batch_size] * full + ([last] if last else []))
    check_size(f"an msprobe dump of {count(images, 'image')}", size, max_bytes, estimated=True)
    return size


def write_dump(encoder: Encoder, pixel_batches: Iterable[torch.Tensor], folder: str | Path) -> Path:
    """Every module call of the forwards over `pixel_batches`, as an msprobe L0 tensor dump
    under `folder` (`step0/rank0/`); returns the folder holding dump.json."""
    from vitport.outputs import write_atomic

    folder = Path(folder)

    def write(tmp: Path) -> None:
        rank = tmp / "step0" / "rank0"
        (rank / TENSOR_DIR).mkdir(parents=True)
        recorder = _Recorder(encoder, rank)
        _record(recorder, pixel_batches)
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
