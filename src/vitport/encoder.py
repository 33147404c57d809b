"""The one contract every family fills: Encoder in, Features out."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitport.devices import Device, dtype_name, out_of_memory_error
from vitport.errors import DeviceError, VitportError
from vitport.outputs import write_atomic

OUTPUT_GROUPS = ("cls", "registers", "patches", "pooled", "logits")


@dataclass(frozen=True)
class TokenLayout:
    """How a model's output sequence is laid out: [CLS?] [registers] [patches]."""

    num_cls: int
    num_registers: int
    patch_size: int

    @property
    def num_prefix(self) -> int:
        return self.num_cls + self.num_registers

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def describe(self, height: int, width: int) -> str:
        gh, gw = self.grid(height, width)
        return (
            f"{self.num_cls} CLS + {self.num_registers} registers + {gh * gw} patches ({gh}x{gw})"
        )


@dataclass(frozen=True)
class Architecture:
    """The numbers that fix a ViT's cost, read from its config (used for FLOPs and reports)."""

    hidden_size: int
    depth: int
    num_heads: int
    mlp_hidden: int
    gated_mlp: bool
    patch_size: int
    in_chans: int = 3


@dataclass
class Features:
    """The one output contract: what an encoder produced for a batch of images."""

    patches: torch.Tensor  # [B, N, D]
    grid: tuple[int, int]
    cls: torch.Tensor | None = None  # [B, D]
    registers: torch.Tensor | None = None  # [B, R, D]
    pooled: torch.Tensor | None = None  # [B, D']
    logits: torch.Tensor | None = None  # [B, C]
    names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def groups(self) -> dict[str, torch.Tensor]:
        """The output groups present, in a fixed order."""
        out = {name: getattr(self, name) for name in OUTPUT_GROUPS}
        return {k: v for k, v in out.items() if v is not None}

    @property
    def batch_size(self) -> int:
        return self.patches.shape[0]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.groups().items()}

    def to(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Features:
        moved = {k: v.to(device=device, dtype=dtype) for k, v in self.groups().items()}
        return replace(self, **moved)

    @staticmethod
    def concat(parts: Sequence[Features]) -> Features:
        """Join batches of the same run along the batch axis."""
        first = parts[0]
        joined = {k: torch.cat([p.groups()[k] for p in parts]) for k in first.groups()}
        names = [n for p in parts for n in p.names]
        return replace(first, names=names, **joined)

    def save(
        self,
        path: str | Path,
        extra: dict[str, torch.Tensor] | None = None,
        extra_header: dict[str, str] | None = None,
    ) -> Path:
        """Write a golden file: tensors as safetensors, everything else as JSON metadata.
        `extra` tensors (block states, named ``blocks/...``) go in the same file."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.groups().items()}
        tensors.update({k: v.contiguous() for k, v in (extra or {}).items()})
        header = {
            "vitport_features": "1",
            "grid": json.dumps(list(self.grid)),
            "names": json.dumps(self.names),
            "meta": json.dumps(self.meta, sort_keys=True),
            **(extra_header or {}),
        }

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp), metadata=header)
            os.chmod(tmp, 0o666 & ~_umask())  # as any file the user writes, not 0600

        try:
            write_atomic(path, write)
        except OSError as exc:
            raise VitportError(f"could not write {path}: {exc.strerror or exc}") from exc
        return path

    @classmethod
    def load(cls, path: str | Path) -> Features:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise VitportError(
                f"features file {path} not found; write one with vitport infer --out"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                groups = [k for k in f.keys() if k in OUTPUT_GROUPS]  # noqa: SIM118
                tensors = {k: f.get_tensor(k) for k in groups}  # block states stay on disk
        except Exception as exc:  # safetensors raises several unrelated types
            raise VitportError(f"{path} is not a safetensors features file ({exc})") from exc
        if header.get("vitport_features") != "1" or "patches" not in tensors:
            raise VitportError(
                f"{path} is not a vitport features file; write one with vitport infer --out"
            )
        return cls(
            grid=tuple(json.loads(header["grid"])),
            names=json.loads(header["names"]),
            meta=json.loads(header["meta"]),
            **tensors,
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass(frozen=True)
class RawOutput:
    """What a family's forward returns: tokens after the final norm, pooled, logits."""

    tokens: torch.Tensor
    pooled: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class Preprocess:
    """Turn PIL images into a pixel batch, with the settings of the model's own config."""

    def __init__(
        self,
        fn: Callable[[list[Any]], torch.Tensor],
        image_size: tuple[int, int],
        settings: dict[str, Any],
    ) -> None:
        self.fn = fn
        self.image_size = image_size
        self.settings = settings

    def __call__(self, images: list[Any]) -> torch.Tensor:
        return self.fn(images)

    def describe(self) -> dict[str, Any]:
        return {"image_size": list(self.image_size), **self.settings}


@dataclass
class Encoder:
    """A loaded model and everything downstream needs to know about it."""

    module: nn.Module
    spec: str
    family: str
    layout: TokenLayout
    arch: Architecture
    preprocess: Preprocess
    device: Device
    dtype: torch.dtype
    forward_fn: Callable[[nn.Module, torch.Tensor], RawOutput]
    blocks: list[nn.Module]
    final_norm: nn.Module | None
    source: str = ""
    weights_sha256: str = ""
    notes: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)  # precision fixes applied, in order
    load_seconds: float = 0.0

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @property
    def image_size(self) -> tuple[int, int]:
        return self.preprocess.image_size

    def block_parts(self, index: int) -> dict[str, nn.Module]:
        """Named sub-modules of one block: attention, mlp and norms, found by structure."""
        return block_parts(self.blocks[index])

    def meta(self) -> dict[str, Any]:
        """What a golden file must record to be comparable on another machine."""
        return {
            "spec": self.spec,
            "family": self.family,
            "weights_sha256": self.weights_sha256,
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "preprocess": self.preprocess.describe(),
            "layout": [self.layout.num_cls, self.layout.num_registers, self.layout.patch_size],
            "fixes": list(self.fixes),
        }

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, names: Sequence[str] = ()) -> Features:
        """Run one pixel batch [B, 3, H, W] and split the tokens by the layout."""
        pixels = pixels.to(device=self.device.torch_device, dtype=self.dtype)
        try:
            raw = self.forward_fn(self.module, pixels)
        except Exception as exc:
            if self.device.is_out_of_memory(exc):
                raise out_of_memory_error(
                    self.device, exc, f"encoding {len(pixels)} images"
                ) from exc
            raise
        return self.split(raw, pixels.shape[-2:], names)

    def split(self, raw: RawOutput, hw: Sequence[int], names: Sequence[str] = ()) -> Features:
        layout, tokens = self.layout, raw.tokens
        grid = layout.grid(int(hw[0]), int(hw[1]))
        expected = layout.num_prefix + grid[0] * grid[1]
        if tokens.shape[1] != expected:
            raise VitportError(
                f"{self.spec}: model returned {tokens.shape[1]} tokens, the layout expects {expected} "
                f"({layout.describe(*hw)}); please report this model"
            )
        return Features(
            cls=tokens[:, 0] if layout.num_cls else None,
            registers=tokens[:, layout.num_cls : layout.num_prefix]
            if layout.num_registers
            else None,
            patches=tokens[:, layout.num_prefix :],
            grid=grid,
            pooled=raw.pooled,
            logits=raw.logits,
            names=list(names),
            meta=self.meta(),
        )

    def to(
        self, device: Device | None = None, dtype: torch.dtype | None = None, copy: bool = True
    ) -> Encoder:
        """This encoder on another device and/or dtype: a copy, or moved in place (copy=False)."""
        device = device or self.device
        dtype = dtype or self.dtype
        if not device.supports(dtype):
            raise DeviceError(
                f"{device} does not support {dtype_name(dtype)}; choose another --dtype"
            )
        module = deepcopy(self.module) if copy else self.module
        try:
            module = module.to(device=device.torch_device, dtype=dtype)
        except Exception as exc:
            if device.is_out_of_memory(exc):
                raise out_of_memory_error(device, exc, "moving the model") from exc
            raise
        index = {id(m): name for name, m in self.module.named_modules()}
        by_name = dict(module.named_modules())

        def same(m: nn.Module | None) -> nn.Module | None:
            return None if m is None else by_name[index[id(m)]]

        return replace(
            self,
            module=module,
            device=device,
            dtype=dtype,
            blocks=[same(b) for b in self.blocks],
            fixes=list(self.fixes),
            final_norm=same(self.final_norm),
        )


NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()


def block_parts(block: nn.Module) -> dict[str, nn.Module]:
    """Attention, MLP and norm sub-modules of a transformer block, found by name and type."""
    parts: dict[str, nn.Module] = {}
    for name, child in block.named_children():
        lowered = name.lower()
        if (
            is_norm(child)
            or "attn" in lowered
            or "attention" in lowered
            or any(key in lowered for key in ("mlp", "ffn", "feed_forward"))
        ):
            parts[name] = child
    return parts


def find_blocks(module: nn.Module, depth: int) -> list[nn.Module]:
    """The ModuleList of `depth` identical transformer blocks."""
    for _, child in module.named_modules():
        if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) == depth:
            kinds = {type(b) for b in child}
            if len(kinds) == 1 and block_parts(child[0]):
                return list(child)
    raise VitportError(f"could not find {depth} transformer blocks in {type(module).__name__}")


__all__ = [
    "Architecture",
    "Encoder",
    "Features",
    "Preprocess",
    "RawOutput",
    "TokenLayout",
    "block_parts",
    "find_blocks",
]
