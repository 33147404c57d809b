"""torchair: torch.compile with the Ascend NPU's graph backend (shipped in torch-npu)."""

from __future__ import annotations

from pathlib import Path

import torch

from vitport.encoder import Encoder
from vitport.runtimes.base import DTYPES, RUNNERS, Forward, Limits, Runner, Setup


class TorchairRunner(Runner):
    name = "torchair"
    limits = Limits(("npu",), DTYPES)
    install = "install torch-npu with CANN (torchair ships in it)"

    def build(self, encoder: Encoder, setup: Setup, cache: Path) -> Forward:
        import torchair  # ships in torch-npu, which the NPU device has imported already

        backend = torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
        encoder.module.compile(backend=backend, dynamic=False)
        return encoder.forward_fn

    def release(self) -> None:
        torch._dynamo.reset()


RUNNERS.register(TorchairRunner.name, TorchairRunner)
