"""What every family's loader hands back, and the checks every family makes the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vitport.encoder import Architecture, Preprocess, RawOutput, TokenLayout
from vitport.errors import VitportError

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class LoadedModel:
    """A model on the CPU in fp32 and what an Encoder needs from it."""

    module: nn.Module
    family: str  # "timm" or "transformers/MODEL_TYPE"
    source: str  # where the weights came from, in words
    forward: Callable[[nn.Module, torch.Tensor], RawOutput]
    layout: TokenLayout
    arch: Architecture
    preprocess: Preprocess
    final_norm: nn.Module | None
    notes: list[str]
    resampled_from: tuple[int, int] | None = None  # the checkpoint's grid, when resampled
    roles: Callable[[nn.Module], dict[str, str]] | None = None  # its family's block roles


def valid_sizes(target: int, patch: int) -> str:
    """The nearest input sizes that are multiples of the patch size (never 0)."""
    below, above = target // patch * patch, (target // patch + 1) * patch
    return f"{below} or {above}" if below >= patch else str(above)


def check_image_size(image_size: int, patch: int) -> None:
    """Refuse an input size the patch grid cannot tile."""
    if image_size % patch:
        raise VitportError(
            f"image_size={image_size} is not a multiple of the patch size {patch}; "
            f"try {valid_sizes(image_size, patch)}",
            params=("image_size=",),
        )
