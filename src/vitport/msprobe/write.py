"""Writing a dump that msprobe reads: every module call of an Encoder's forward, in msprobe's
layout and field names, so that `msprobe compare` reads it."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vitport.errors import VitportError
from vitport.hooks import hooked

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
