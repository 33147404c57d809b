"""vitport: bring vision-transformer encoders to new hardware, and prove the port faithful and fast.

``import vitport`` is light: its names (``load``, ``Encoder``, ...) import torch when first
used, so that ``vitport --version`` answers at once.

Importing vitport before torch turns off torch's device-backend autoload
(``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` unless already set): a half-installed torch_npu (CANN not
sourced, or built for another torch) would otherwise make ``import torch`` itself fail. Instead
vitport's Device layer imports an installed torch_npu itself, once, when ``vitport.device`` is
first imported (by ``vitport.load`` and every command that runs a model), as torch's autoload
would, and when that fails it hides torch_npu from other libraries and keeps the reason: the CPU
keeps working, and asking for the NPU gives one line with the cure.
"""

import importlib
import importlib.metadata
import os
import sys
from typing import TYPE_CHECKING, Any

if "torch" not in sys.modules:
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

if TYPE_CHECKING:
    from vitport.encoder import Encoder, Features, TokenLayout
    from vitport.families import load

__all__ = ["Encoder", "Features", "TokenLayout", "load"]

try:
    __version__ = importlib.metadata.version("vitport")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_HOMES = {"Encoder": "vitport.encoder", "Features": "vitport.encoder",
          "TokenLayout": "vitport.encoder", "load": "vitport.families"}  # fmt: skip


def __getattr__(name: str) -> Any:
    """The public names, imported (with torch) when first used."""
    if name not in _HOMES:
        raise AttributeError(f"module 'vitport' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
