"""no-tf32: turn off TF32/HF32 and reduced-precision reductions. These are process-wide torch
settings, not the encoder's: `process_settings_restored` undoes them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from vitport.device.precision import ABSENT, STRICT_SETTINGS
from vitport.encoder import Encoder
from vitport.fixes.base import Fix, FixReport
from vitport.format import count


@contextlib.contextmanager
def process_settings_restored() -> Iterator[None]:
    """Undo whatever `no-tf32` (or anything else) changes in the process-wide switches."""
    saved = [(s, s.get()) for s in STRICT_SETTINGS]
    try:
        yield
    finally:
        for setting, value in saved:
            if value is not ABSENT and setting.get() != value:
                setting.put(value)


def no_tf32(encoder: Encoder) -> FixReport:
    present = [(s, s.get()) for s in STRICT_SETTINGS]
    present = [(s, before) for s, before in present if before is not ABSENT]
    for setting, before in present:
        if before != setting.strict:
            setting.put(setting.strict)
    flipped = tuple(s.name for s, before in present if s.get() != before)
    if flipped:
        detail = f"set {count(len(flipped), 'process-wide setting')} strict: {', '.join(flipped)}"
    else:
        detail = f"already strict: nothing to change (all {count(len(present), 'setting')} were)"
    return FixReport("no-tf32", len(flipped), flipped, detail)


TEMPLATE = """\
# no-tf32: float32 math stays float32: no TF32 (CUDA), no HF32 (Ascend), no reduced-precision
# reductions (process-wide settings)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
torch.set_float32_matmul_precision("highest")
if hasattr(torch, "npu"):  # torch_npu is imported: Ascend's HF32 is its TF32
    torch.npu.matmul.allow_hf32 = False
    torch.npu.conv.allow_hf32 = False
"""

FIX = Fix(
    "no-tf32",
    "turn off TF32/HF32 and reduced-precision reductions (process-wide settings)",
    no_tf32,
    TEMPLATE,
)
