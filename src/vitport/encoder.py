"""The one contract every family fills: Encoder in, Features out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitport.errors import DeviceError, VitportError
from vitport.format import count

if TYPE_CHECKING:  # torch loads with the first model: the records above it need none
    import torch
    from torch import nn

    from vitport.device import Device
    from vitport.port.manifest import Manifest

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
    """The numbers that fix a ViT's cost and shape, independent of any checkpoint layout.

    Loading fills the first seven (FLOPs and reports need them); conversion fills the rest.
    """

    hidden_size: int
    depth: int
    num_heads: int
    mlp_hidden: int
    gated_mlp: bool
    patch_size: int
    in_chans: int = 3
    family: str = ""  # for conversion: dinov2, dinov2-registers, vit, aimv2
    grid: int = 0  # side of the position-embedding grid
    registers: int = 0
    num_classes: int = 0
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    head_flops: float = 0.0  # per image, of a pooling head or projection the blocks do not count
    # the MLP activation the model was trained with, as transformers names it (gelu, quick_gelu,
    # gelu_pytorch_tanh, silu); "" where the loader cannot tell. Fixes keep to it.
    activation: str = ""

    @property
    def image_size(self) -> int:
        """The input side the position embeddings were trained for."""
        return self.grid * self.patch_size

    def to_dict(self) -> dict[str, Any]:
        """The form conversion.json records (its own, shorter key names)."""
        return {
            "family": self.family,
            "hidden": self.hidden_size,
            "depth": self.depth,
            "heads": self.num_heads,
            "mlp_hidden": self.mlp_hidden,
            "patch": self.patch_size,
            "grid": self.grid,
            "registers": self.registers,
            "num_classes": self.num_classes,
            "norm_eps": self.norm_eps,
            "qkv_bias": self.qkv_bias,
            "gated": self.gated_mlp,
        }


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

    def nonfinite_groups(self) -> list[str]:
        """The output groups that hold NaN or inf somewhere (fp16 overflow, a broken kernel)."""
        import torch

        return [name for name, t in self.groups().items() if not torch.isfinite(t).all()]

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
        import torch

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
        """Write a golden file (see vitport.golden); `extra` tensors (block states, named
        ``blocks/...``) and `extra_header` entries go in the same file."""
        from vitport import golden

        return golden.write(path, self, extra, extra_header)

    @classmethod
    def load(cls, path: str | Path) -> Features:
        """Read a golden file's features; its block states stay on disk."""
        from vitport import golden

        return cls(**golden.read(path, OUTPUT_GROUPS))


@dataclass(frozen=True)
class RawOutput:
    """What a family's forward returns: tokens after the final norm, pooled, logits."""

    tokens: torch.Tensor
    pooled: torch.Tensor | None = None
    logits: torch.Tensor | None = None


@dataclass(frozen=True)
class Preprocessing:
    """Eval preprocessing in neutral terms: resize the short side, centre-crop `size`, normalise;
    or, with crop_mode "squash" (ViT, SigLIP), resize straight to `size` × `size`."""

    size: int
    crop_pct: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_mode: str = "center"  # timm's names: "center" or "squash"

    @property
    def resize(self) -> int:
        return round(self.size / self.crop_pct)

    def hf_processor(self) -> Any:
        from transformers import BitImageProcessor

        squash = self.crop_mode == "squash"
        return BitImageProcessor(
            do_resize=True,
            size={"height": self.size, "width": self.size}
            if squash
            else {"shortest_edge": self.resize},
            do_center_crop=not squash,
            crop_size={"height": self.size, "width": self.size},
            image_mean=list(self.mean),
            image_std=list(self.std),
            resample=3 if self.interpolation == "bicubic" else 2,
        )

    def timm_data_config(self, size: int) -> dict[str, Any]:
        return {
            "input_size": (3, size, size),
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "interpolation": self.interpolation,
        }


class Preprocess:
    """Turn PIL images into a pixel batch, with the settings of the model's own config and the
    same in neutral terms (`recipe`, what a converted checkpoint is written with)."""

    def __init__(
        self,
        fn: Callable[[list[Any]], torch.Tensor],
        image_size: tuple[int, int],
        settings: dict[str, Any],
        recipe: Preprocessing | None = None,
    ) -> None:
        self.fn = fn
        self.image_size = image_size
        self.settings = settings
        self.recipe = recipe

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
    resampled_from: tuple[int, int] | None = None  # the checkpoint's position grid, if resampled
    fixes: list[str] = field(default_factory=list)  # precision fixes applied, in order
    load_seconds: float = 0.0
    runtime: str = "torch"  # what runs the forward (see vitport.runtimes)
    # the roles of a block's parts, as its family reads them (None: by name and kind)
    roles: Callable[[nn.Module], dict[str, str]] | None = None
    port: Manifest | None = None  # a packaged port's vitport.json (see vitport.port.manifest)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @property
    def image_size(self) -> tuple[int, int]:
        return self.preprocess.image_size

    def block_parts(self, index: int) -> dict[str, nn.Module]:
        """Named sub-modules of one block: attention, mlp and norms, as its family reads them."""
        return block_parts(self.blocks[index], self.roles)

    def block_roles(self, index: int) -> dict[str, str]:
        """The role of each part of one block ("attention", "mlp", "norm"), by child name."""
        return (self.roles or block_roles)(self.blocks[index])

    def meta(self) -> dict[str, Any]:
        """What a golden file must record to be comparable on another machine."""
        from vitport.device import dtype_name

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

    def encode(self, pixels: torch.Tensor, names: Sequence[str] = ()) -> Features:
        """Run one pixel batch [B, 3, H, W] and split the tokens by the layout."""
        import torch

        from vitport.device import out_of_memory_error

        with torch.inference_mode():
            pixels = pixels.to(device=self.device.torch_device, dtype=self.dtype)
            try:
                raw = self.forward_fn(self.module, pixels)
            except Exception as exc:
                if self.device.is_out_of_memory(exc):
                    raise out_of_memory_error(
                        self.device, exc, f"encoding {count(len(pixels), 'image')}"
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
        from vitport.device import dtype_name, out_of_memory_error

        device = device or self.device
        dtype = dtype or self.dtype
        if not device.supports(dtype):
            raise DeviceError(
                f"{device} does not support {dtype_name(dtype)}; choose another dtype",
                params=("dtype",),
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


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: a torch norm, or a module whose type name says norm and that holds
    a weight tensor (its learned scale), as the norms of HF and timm models do."""
    import torch
    from torch import nn

    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
        return True
    weight = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor)


def part_role(name: str, module: nn.Module) -> str | None:
    """A block child's role, "attention", "mlp" or "norm": the first two by name, a norm by kind."""
    lowered = name.lower()
    if "attn" in lowered or "attention" in lowered:
        return "attention"
    if any(key in lowered for key in ("mlp", "ffn", "feed_forward")):
        return "mlp"
    return "norm" if is_norm(module) else None


def block_roles(block: nn.Module) -> dict[str, str]:
    """The role of each part of a transformer block, by child name, in the block's order."""
    roles = {name: part_role(name, child) for name, child in block.named_children()}
    return {name: role for name, role in roles.items() if role is not None}


def block_parts(
    block: nn.Module, roles: Callable[[nn.Module], dict[str, str]] | None = None
) -> dict[str, nn.Module]:
    """Attention, MLP and norm sub-modules of a transformer block, by `roles` (a family's
    reading) or else by name and kind (see block_roles)."""
    children = dict(block.named_children())
    return {name: children[name] for name in (roles or block_roles)(block)}


def find_blocks(
    module: nn.Module, depth: int, roles: Callable[[nn.Module], dict[str, str]] | None = None
) -> list[nn.Module]:
    """The ModuleList of `depth` identical transformer blocks."""
    from torch import nn

    for _, child in module.named_modules():
        if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) == depth:
            kinds = {type(b) for b in child}
            if len(kinds) == 1 and block_parts(child[0], roles):
                return list(child)
    raise VitportError(f"could not find {depth} transformer blocks in {type(module).__name__}")


__all__ = [
    "Architecture",
    "Encoder",
    "Features",
    "Preprocess",
    "Preprocessing",
    "RawOutput",
    "TokenLayout",
    "block_parts",
    "block_roles",
    "find_blocks",
]
