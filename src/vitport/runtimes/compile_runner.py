"""compile: the torch runner's module under torch.compile (dynamic batch)."""

from __future__ import annotations

from pathlib import Path

import torch

from vitport.encoder import Encoder
from vitport.runtimes.base import ATTENTIONS, DTYPES, RUNNERS, Forward, Limits, Setup
from vitport.runtimes.torch_runner import TorchRunner


def compile_encoder(encoder: Encoder, mode: str | None = None) -> None:
    """torch.compile the module in place (names and hooks stay as they are). The batch size is
    dynamic from the start: one graph serves every batch of 2 or more (dynamo gives batch 1 a
    graph of its own), where the default would compile the first size statically as well."""
    encoder.module.compile(mode=mode, dynamic=True)


class CompileRunner(TorchRunner):
    """torch.compile, in place: each build compiles afresh, and release forgets dynamo's
    graphs (its cache limits are per process)."""

    name = "compile"
    limits = Limits(("cpu", "cuda", "npu", "xpu"), DTYPES, attentions=ATTENTIONS)

    def build(self, encoder: Encoder, setup: Setup, cache: Path) -> Forward:
        torch._dynamo.reset()
        forward = super().build(encoder, setup, cache)
        compile_encoder(encoder)
        return forward

    def release(self) -> None:
        torch._dynamo.reset()


RUNNERS.register(CompileRunner.name, CompileRunner)
