"""Prove a conversion: the converted model and its source function on the same pixels.

When they differ, teacher forcing block by block (each converted block run on the source's input
to it) finds the first block, and inside it the part, whose own output differs; the source tensors
that were mapped into that part are named.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitport import records
from vitport.compare.verdict import Judgement, judge_features, thresholds_for
from vitport.encoder import Encoder, Features, block_parts, block_roles
from vitport.format import pct
from vitport.hooks import ErrorSum, first_tensor, hooked, teacher_force

LOCAL_LIMIT = 1e-4  # teacher-forced relative error of one block or part that fp32 never reaches


@dataclass
class Check:
    """One verification run: what ran against what, on which batch size, and the judgement."""

    label: str
    batch_size: int
    judgement: Judgement
    skipped: dict[str, str] = field(default_factory=dict)  # group -> why it is not compared

    @property
    def passed(self) -> bool:
        return bool(self.judgement)

    def to_dict(self) -> dict[str, Any]:
        """The judgement's groups and verdict written in line, after the verdict's outcome."""
        return {
            "label": self.label,
            "batch_size": self.batch_size,
            "passed": self.passed,
            **records.to_dict(self.judgement),
            "skipped": self.skipped,
        }


def run_features(encoder: Encoder, pixels: list[torch.Tensor]) -> Features:
    return Features.concat([encoder.encode(p).to("cpu", torch.float32) for p in pixels])


def compare_functions(
    label: str,
    reference: Features,
    output: Features,
    skipped: Mapping[str, str] = (),
    batch_size: int = 0,
) -> Check:
    """Judge `output` against `reference` at fp32 limits on the groups both have."""
    skipped = dict(skipped)
    ref = {k: v for k, v in reference.groups().items() if k not in skipped}
    out = output.groups()
    for name in set(ref) ^ set(out):
        skipped.setdefault(name, "only one side has this output")
    ref = {k: v for k, v in ref.items() if k in out}
    out = {k: out[k] for k in ref}
    return Check(label, batch_size, judge_features(ref, out, thresholds_for("fp32")), skipped)


# --- naming the culprit ------------------------------------------------------------------------


def _roles(block: nn.Module) -> dict[str, nn.Module]:
    """The block's first attention and MLP, and its norms numbered in order (norm1, norm2)."""
    parts, roles, norms = block_parts(block), {}, 0
    for name, role in block_roles(block).items():
        if role == "norm":
            norms += 1
            role = f"norm{norms}"
        roles.setdefault(role, parts[name])
    return roles


def _forced_error(ref_module: nn.Module, out_module: nn.Module, pixels, source: Encoder) -> float:
    """Relative error of `out_module` run on the input `ref_module` saw, against its output."""
    total = ErrorSum()
    captured: dict[str, Any] = {}

    def hook(_m: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        captured["args"], captured["kwargs"], captured["out"] = args, kwargs, first_tensor(output)

    with hooked([(ref_module, hook)]), torch.inference_mode():
        for batch in pixels:
            source.forward_fn(source.module, batch)
            hidden = first_tensor((captured["args"], captured["kwargs"]))
            teacher_force(out_module, (hidden,), {}, captured["out"], total)
    return total.rel_error


def culprit(
    source: Encoder,
    target: Encoder,
    pixels: list[torch.Tensor],
    origin: Mapping[str, Sequence[str]],
) -> str:
    """Where the converted model first computes differently, and the source tensors behind it."""
    pixels = pixels[:1]
    for index, (ref_block, out_block) in enumerate(zip(source.blocks, target.blocks, strict=False)):
        try:
            error = _forced_error(ref_block, out_block, pixels, source)
        except Exception:  # noqa: BLE001 - a block that cannot run alone: say nothing finer
            return "the blocks could not be run one by one to find it"
        if error <= LOCAL_LIMIT:
            continue
        part, ref_roles, out_roles = "", _roles(ref_block), _roles(out_block)
        for role in ("norm1", "attention", "norm2", "mlp"):
            if role in ref_roles and role in out_roles:
                try:
                    part_error = _forced_error(ref_roles[role], out_roles[role], pixels, source)
                except Exception:  # noqa: BLE001 - parts with extra arguments: stay at the block
                    continue
                if part_error > LOCAL_LIMIT:
                    part, error = role, part_error
                    break
        names = _source_tensors(origin, index, part)
        where = f"block {index}" + (f" {part}" if part else "")
        return (
            f"{where} computes differently (teacher-forced relative error {pct(error)}); source tensors "
            f"{', '.join(names[:4]) or '?'}: a transposed or reordered weight keeps its shape"
        )
    return "no block differs alone: the embeddings, the final norm or the output heads do"


_KEYWORDS = {
    "attention": ("attn",),
    "mlp": ("mlp",),
    "norm1": ("norm1", "norm_1"),
    "norm2": ("norm2", "norm_2"),
}


def _source_tensors(origin: Mapping[str, Sequence[str]], index: int, part: str) -> list[str]:
    names = sorted({s for sources in origin.values() for s in sources})
    in_block = [n for n in names if re.search(rf"\.{index}\.", n)]
    keys = _KEYWORDS.get(part)
    if keys:
        in_block = [n for n in in_block if any(k in n for k in keys)] or in_block
    return [n for n in in_block if n.endswith("weight")] + [
        n for n in in_block if not n.endswith("weight")
    ]
