"""FLOPs of a ViT forward pass, counted from its config, with a profiler cross-check.

Convention: one multiply-add is 2 FLOPs (so GMACs = GFLOPs / 2, the figure timm publishes
as ``gmacs``). Only matrix multiplies are counted: the patch-embedding convolution, the qkv
and output projections, the two attention products (Q·Kᵀ and A·V) and the MLP. Norms,
softmax, activations, biases, residual adds, layer scale, position embeddings and any
classifier head are ignored; in a ViT they are well under 1% of the total.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vitport.encoder import Architecture

__all__ = ["FlopCount", "count_flops_by_profiler", "flops_per_image"]


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one image's forward pass, split by where they are spent."""

    patch_embed: float
    attention_proj: float  # qkv and output projections, all blocks
    attention_scores: float  # Q·Kᵀ and A·V, all blocks
    mlp: float  # all blocks
    total: float
    tokens: int = 0  # sequence length T (prefix tokens + patches)
    head: float = 0.0  # a pooling head or projection the family counts (Architecture.head_flops)

    @property
    def gflops(self) -> float:
        return self.total / 1e9

    @property
    def gmacs(self) -> float:
        """Multiply-adds in billions (total / 2): the unit timm's tables use."""
        return self.total / 2e9


def flops_per_image(arch: Architecture, image_size: tuple[int, int], num_prefix: int) -> FlopCount:
    """FLOPs of one image at ``image_size`` (H, W) with ``num_prefix`` CLS/register tokens.

    With D = hidden size, p = patch size, C = input channels, M = MLP hidden size,
    N = (H // p)(W // p) patches and T = num_prefix + N tokens:

    * patch embed: 2·N·(C·p²)·D
    * per block: qkv 2·T·D·3D, output projection 2·T·D·D, scores 2·T²·D + 2·T²·D,
      MLP 2·T·D·M·2 (two matrices) or 2·T·D·M·3 for a gated (SwiGLU) MLP;
    * plus ``arch.head_flops``, what the family says its pooling head or projection costs.
    """
    height, width = image_size
    p, d, m = arch.patch_size, arch.hidden_size, arch.mlp_hidden
    patches = (height // p) * (width // p)
    if patches == 0:
        raise ValueError(f"image {height}x{width} is smaller than one {p}x{p} patch")
    if num_prefix < 0:
        raise ValueError(f"num_prefix must not be negative, got {num_prefix}")
    t = num_prefix + patches
    depth = arch.depth
    patch_embed = 2.0 * patches * (arch.in_chans * p * p) * d
    attention_proj = depth * (2.0 * t * d * 3 * d + 2.0 * t * d * d)
    attention_scores = depth * (2.0 * t * t * d + 2.0 * t * t * d)
    mlp = depth * 2.0 * t * d * m * (3 if arch.gated_mlp else 2)
    return FlopCount(
        patch_embed=patch_embed,
        attention_proj=attention_proj,
        attention_scores=attention_scores,
        mlp=mlp,
        total=patch_embed + attention_proj + attention_scores + mlp + arch.head_flops,
        tokens=t,
        head=arch.head_flops,
    )


def _attention_flops(
    query: Sequence[int], key: Sequence[int], value: Sequence[int], *args: Any, **kwargs: Any
) -> int:
    """Q·Kᵀ plus A·V for q [B, Hq, Sq, Dq], k [B, Hk, Sk, Dq], v [B, Hk, Sk, Dv]."""
    *batch, s_q, d_q = query
    s_k, d_v = key[-2], value[-1]
    groups = 1
    for size in batch:
        groups *= size
    return 2 * groups * s_q * s_k * d_q + 2 * groups * s_q * s_k * d_v


def _attention_mapping() -> dict[Any, Callable[..., int]]:
    """Attention kernels FlopCounterMode does not count by itself (CPU, MPS, out-of-tree)."""
    aten = torch.ops.aten
    names = (
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_attention_math_for_mps",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    return {getattr(aten, n): _attention_flops for n in names if hasattr(aten, n)}


def count_flops_by_profiler(module: Callable[[torch.Tensor], Any], pixels: torch.Tensor) -> float:
    """FLOPs of ``module(pixels)`` for the whole batch, as ``FlopCounterMode`` counts them.

    An independent check of :func:`flops_per_image` (divide by the batch size to compare).
    ``FlopCounterMode`` counts matmuls, convolutions and the CUDA SDPA kernels; the CPU, MPS
    and "overrideable" SDPA kernels are added here with the same formula, so eager and SDPA
    attention count alike. Kernels it does not know (e.g. vendor-fused attention reached
    without SDPA) are not counted: run the check on CPU.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_attention_mapping())
    with torch.no_grad(), counter:
        module(pixels)
    return float(counter.get_total_flops())
