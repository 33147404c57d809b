"""vitport: bring vision-transformer encoders to new hardware, and prove the port faithful and fast.

Importing vitport before torch turns off torch's device-backend autoload
(``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` unless already set): a half-installed torch_npu (CANN not
sourced, or built for another torch) would otherwise make ``import torch`` itself fail. Instead
vitport's Device layer imports an installed torch_npu itself, once, at ``import vitport`` (as
torch's autoload would), and when that fails it hides torch_npu from other libraries and keeps
the reason: the CPU keeps working, and asking for the NPU gives one line with the cure.
"""

import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

from vitport.device import settle_torch_npu  # noqa: E402
from vitport.encoder import Encoder, Features, TokenLayout  # noqa: E402
from vitport.families import load  # noqa: E402

settle_torch_npu()

__all__ = ["Encoder", "Features", "TokenLayout", "load"]
__version__ = "0.1.0"
