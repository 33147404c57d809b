"""Weight files and the one-line errors every family gives for weights it cannot read."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from vitport.errors import WeightsError, one_line

if TYPE_CHECKING:
    import torch

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def weights_file(path: Path) -> Path:
    """The transformers weights file in directory `path` (the directory itself when none)."""
    return next((path / n for n in WEIGHT_FILES if (path / n).is_file()), path)


def is_unsafe_pickle(exc: BaseException) -> bool:
    """torch's weights-only unpickler refused the file: it holds more than tensors."""
    return isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc)


def unsafe_pickle_error(path: Path | str) -> WeightsError:
    return WeightsError(
        f"{path} holds objects that are not tensors, and unpickling them may run code; vitport "
        "does not load it: use the safetensors weights from a trusted source"
    )


def damaged_weights_error(path: Path, exc: BaseException) -> WeightsError:
    """One line for a weights file that is cut short or corrupt, with the cure."""
    cure = "download it again"
    if "demo" in path.parts:
        cure = "run again: vitport rebuilds its demo cache when its weights hash does not match"
    return WeightsError(f"{path} is damaged (cut short or corrupt: {one_line(exc)}); {cure}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from .pth/.bin with weights-only unpickling."""
    import torch

    if not path.is_file():
        raise WeightsError(f"weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling and safetensors raise many types
        if is_unsafe_pickle(exc):
            raise unsafe_pickle_error(path) from exc
        if type(exc).__name__ == "SafetensorError":
            raise damaged_weights_error(path, exc) from exc
        raise WeightsError(
            f"could not read weights {path} ({type(exc).__name__}); only safetensors or "
            "weights-only PyTorch files are accepted"
        ) from exc
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state
