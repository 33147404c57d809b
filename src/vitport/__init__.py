"""vitport: bring vision-transformer encoders to new hardware, and prove the port faithful and fast.

``import vitport`` is light where no torch device backend (torch_npu) is installed: its names (``load``, ``Encoder``,
...) import torch when first used, so that ``vitport --version`` answers at once.

Importing vitport before torch turns off torch's device-backend autoload
(``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` unless already set): a half-installed torch_npu (CANN not
sourced, or built for another torch) would otherwise make ``import torch`` itself fail. Instead
vitport's Device layer imports an installed torch_npu itself, once, at ``import vitport`` (as
torch's autoload would, so that ``import vitport; import torch`` still has the ``npu`` device),
and when that fails it hides torch_npu from other libraries and keeps the reason: the CPU keeps
working, and asking for the NPU gives one line with the cure.
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

if importlib.metadata.entry_points(group="torch.backends"):  # a device backend (torch_npu)
    from vitport.device import settle_torch_npu

    settle_torch_npu()

try:
    __version__ = importlib.metadata.version("vitport")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_HOMES = {
    "Encoder": "vitport.encoder",
    "Features": "vitport.encoder",
    "TokenLayout": "vitport.encoder",
    "load": "vitport.families",
}


def __getattr__(name: str) -> Any:
    """The public names, imported (with torch) when first used."""
    if name not in _HOMES:
        raise AttributeError(f"module 'vitport' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
