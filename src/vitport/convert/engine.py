"""One engine for every mapping table: rules are data, each with its inverse.

A pattern names a tensor or a module prefix; ``{i}`` stands for a block index. A key matches a
pattern when it equals it or extends it by a dotted suffix (``.weight``, ``.bias``), so one rule
covers a module's weight and bias. Multi-tensor rules (split, concat, fold) pair their tensors by
the same index and suffix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from typing import TYPE_CHECKING

from vitport.errors import WeightsError

if TYPE_CHECKING:
    import torch


class ConversionError(WeightsError):
    """A source does not fit its mapping table; the message names the tensor."""


@cache
def _regex(pattern: str) -> re.Pattern[str]:
    body = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(rf"^{body}(?P<s>(?:\.[\w]+)*)$")


def _fill(pattern: str, index: str | None, suffix: str) -> str:
    name = pattern.replace("{i}", index) if index is not None else pattern
    return name + suffix


@dataclass(frozen=True)
class Rule:
    """``op`` turns the tensors named by ``sources`` into those named by ``targets``.

    ops: rename, split (chunk along dim 0), concat (its inverse), transpose (of a weight),
    reshape (to the target's shape), fold_class_pos (class position into the class token, the
    position table loses its first row), unfold_class_pos (its inverse: a zero class position),
    drop (a source tensor left out on purpose) and fill (a target tensor the source lacks, zeros).
    """

    op: str
    sources: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    reason: str = ""

    def inverse(self) -> Rule:
        op = INVERSE_OPS[self.op]
        return replace(self, op=op, sources=self.targets, targets=self.sources)


INVERSE_OPS = {
    "rename": "rename",
    "split": "concat",
    "concat": "split",
    "transpose": "transpose",
    "reshape": "reshape",
    "fold_class_pos": "unfold_class_pos",
    "unfold_class_pos": "fold_class_pos",
    "drop": "fill",
    "fill": "drop",
}


def rename(source: str, target: str) -> Rule:
    return Rule("rename", (source,), (target,))


def split(source: str, *targets: str) -> Rule:
    return Rule("split", (source,), tuple(targets))


def drop(source: str, reason: str) -> Rule:
    return Rule("drop", (source,), (), reason)


def fill(target: str, reason: str) -> Rule:
    return Rule("fill", (), (target,), reason)


@dataclass(frozen=True)
class Table:
    """A mapping from one checkpoint layout to another, for one model family."""

    name: str
    version: int
    source: str  # layout name
    target: str
    family: str
    rules: tuple[Rule, ...]

    def inverse(self, name: str) -> Table:
        return Table(
            name=name,
            version=self.version,
            source=self.target,
            target=self.source,
            family=self.family,
            rules=tuple(r.inverse() for r in self.rules),
        )


@dataclass
class Converted:
    """What applying a table produced: target tensors, where each came from, what was dropped."""

    tensors: dict[str, torch.Tensor]
    origin: dict[str, tuple[str, ...]]  # target name -> source names
    dropped: dict[str, str] = field(default_factory=dict)  # source name -> reason
    filled: dict[str, str] = field(default_factory=dict)  # target name -> reason


def _matches(pattern: str, keys: list[str]) -> list[tuple[str, str | None, str]]:
    """(key, block index, suffix) for every key the pattern covers."""
    found = []
    for key in keys:
        m = _regex(pattern).match(key)
        if m:
            found.append((key, m.groupdict().get("i"), m.group("s")))
    return found


def source_names(table: Table, expected: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """The source tensor each expected target tensor needs: {source name: target name}."""
    needed: dict[str, str] = {}
    keys = list(expected)
    for rule in table.rules:
        if not rule.targets or rule.op == "fill":
            continue
        for key, index, suffix in _matches(rule.targets[0], keys):
            for pattern in rule.sources:
                needed.setdefault(_fill(pattern, index, suffix), key)
    return needed


def _run(rule: Rule, inputs: list[torch.Tensor], shapes: list[tuple[int, ...] | None]):
    import torch

    op = rule.op
    if op == "rename":
        return [inputs[0]]
    if op == "transpose":  # a module's weight; its bias stays as it is
        tensor = inputs[0]
        return [tensor.transpose(0, 1).contiguous() if tensor.ndim >= 2 else tensor]
    if op == "reshape":
        return [inputs[0].reshape(shapes[0]) if shapes[0] is not None else inputs[0]]
    if op == "split":
        parts = len(rule.targets)
        if inputs[0].shape[0] % parts:
            raise ValueError(f"its first dimension {inputs[0].shape[0]} does not split in {parts}")
        return [c.contiguous() for c in inputs[0].chunk(parts, dim=0)]
    if op == "concat":
        return [torch.cat(inputs, dim=0)]
    if op == "fold_class_pos":
        cls, pos = inputs
        return [cls + pos[:, :1], pos[:, 1:].contiguous()]
    if op == "unfold_class_pos":
        cls, pos = inputs
        return [cls, torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)]
    raise ValueError(f"unknown op {op!r}")


def apply(
    table: Table, state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]
) -> Converted:
    """Map `state` through `table` onto the `expected` target names and shapes.

    Every source tensor must be consumed or dropped with the table's reason, every expected
    target tensor filled with its expected shape; anything else is a ConversionError naming the
    tensor. Checks run before any tensor is copied."""
    import torch

    needed = source_names(table, expected)
    keys = list(state)
    dropped: dict[str, str] = {}
    for rule in table.rules:
        if rule.op == "drop":
            for key, _, _ in _matches(rule.sources[0], keys):
                dropped[key] = rule.reason
    missing = [name for name in needed if name not in state]
    if missing:
        raise ConversionError(
            f"the source lacks tensor '{missing[0]}' (needed for '{needed[missing[0]]}'"
            f"{f', and {len(missing) - 1} more' if len(missing) > 1 else ''}); "
            f"the checkpoint is incomplete or not in the {table.source} layout"
        )
    unknown = [k for k in keys if k not in needed and k not in dropped]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        ruled = any(_matches(p, unknown[:1]) for r in table.rules for p in r.sources)
        why = (
            "the target architecture has no place for it; does the source match arch=... / its "
            "config?"
            if ruled
            else f"mapping {table.name} has no rule for it; is the checkpoint from another model "
            "or layout?"
        )
        raise ConversionError(
            f"unknown source tensor '{unknown[0]}'{more}: {why}", params=("arch=...",)
        )

    out = Converted({}, {}, dropped)
    for rule in table.rules:
        if rule.op == "fill":
            for key, _, _ in _matches(rule.targets[0], list(expected)):
                out.tensors[key] = torch.zeros(expected[key])
                out.origin[key] = ()
                out.filled[key] = rule.reason
            continue
        if rule.op == "drop":
            continue
        for key, index, suffix in _matches(rule.sources[0], keys):
            if key in dropped:
                continue
            names = [_fill(p, index, suffix) for p in rule.sources]
            targets = [_fill(p, index, suffix) for p in rule.targets]
            absent = [n for n in names if n not in state]
            if absent:
                raise ConversionError(f"the source lacks tensor '{absent[0]}' (pairs with '{key}')")
            shapes = [expected.get(t) for t in targets]
            try:
                results = _run(rule, [state[n] for n in names], shapes)
            except (RuntimeError, ValueError, IndexError) as exc:
                raise ConversionError(
                    f"source tensor '{key}' has shape {tuple(state[key].shape)}, which cannot "
                    f"become {', '.join(targets)} {tuple(s for s in shapes if s)}: {exc}"
                ) from exc
            for target, tensor in zip(targets, results, strict=True):
                out.tensors[target] = tensor
                out.origin[target] = tuple(names)

    for target, shape in expected.items():
        if target not in out.tensors:
            raise ConversionError(
                f"target tensor '{target}' is not filled by mapping {table.name}; "
                "the source layout lacks it"
            )
        got = tuple(out.tensors[target].shape)
        if got != tuple(shape):
            source = ", ".join(out.origin[target]) or target
            raise ConversionError(
                f"source tensor '{source}' has the wrong shape: it becomes '{target}' "
                f"of shape {got}, the target architecture needs {tuple(shape)}; "
                "does the source match arch=... / its config?",
                params=("arch=...",),
            )
    extra = [t for t in out.tensors if t not in expected]
    if extra:
        source = ", ".join(out.origin[extra[0]])
        raise ConversionError(
            f"source tensor '{source}' has no place in the target ('{extra[0]}' is not a "
            "tensor of the target architecture); does the source match arch=... / its config?",
            params=("arch=...",),
        )
    return out
