"""vitport: bring vision-transformer encoders to new hardware, and prove the port faithful and fast.

Importing vitport before torch turns off torch's device-backend autoload
(``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` unless already set): a half-installed torch_npu (CANN not
sourced, or built for another torch) would otherwise make ``import torch`` itself fail. vitport
imports torch_npu explicitly, from its Device layer, when an NPU is asked for or listed, and
turns a failure into one line with the cure; the CPU keeps working.
"""

import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

from vitport.devices import settle_torch_npu  # noqa: E402
from vitport.encoder import Encoder, Features, TokenLayout  # noqa: E402
from vitport.families import load  # noqa: E402

settle_torch_npu()

__all__ = ["Encoder", "Features", "TokenLayout", "load"]
__version__ = "0.1.0"
