"""What every fix shares: its record, its report, finding its targets by module type, swapping
them, and the float32 wrapper that several fixes build on."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from vitport.encoder import Encoder
from vitport.errors import VitportError
from vitport.format import count

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class FixReport:
    """What one fix changed."""

    name: str
    changed: int  # modules replaced / settings flipped
    targets: tuple[str, ...]  # qualified names of changed modules (or settings)
    detail: str  # one line


@dataclass(frozen=True)
class Fix:
    """A named fix: what it does, the function that applies it to an encoder, and its
    standalone `template`.

    The template is short plain torch code that applies the same fix without vitport, as a
    packaged port's ``inference.py`` writes it out (see :mod:`vitport.port.standalone`). It runs
    with these names in scope: ``model``, the ``nn.Module`` the script calls (already on its
    device and in its dtype); ``blocks``, its transformer blocks in order; ``final_norm``, the
    dotted name of the norm on its output tokens inside ``model`` ("" where there is none); and
    ``torch``, ``nn`` (``torch.nn``) and ``F`` (``torch.nn.functional``). It computes what
    `apply` makes the encoder compute; anything else it needs, it imports itself.
    """

    name: str
    help: str
    apply: Callable[[Encoder], FixReport]
    template: str


# --------------------------------------------------------------------------- float32 wrapper


def _first_float_dtype(tree: Any) -> torch.dtype | None:
    leaves, _ = tree_flatten(tree)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf.dtype
    return None


def _cast(tree: Any, source: tuple[torch.dtype, ...], target: torch.dtype) -> Any:
    def cast(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.dtype in source:
            return leaf.to(target)
        return leaf

    return tree_map(cast, tree)


class RunInFP32(nn.Module):
    """Run the wrapped module in float32: inputs upcast, parameters upcast, outputs cast back.

    Inputs already in float32 (or float64) run the module unchanged. The upcast happens at
    every call, so the wrapper stays right after the encoder is moved to another dtype.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        dtype = _first_float_dtype((args, kwargs))
        if dtype not in LOW_PRECISION:
            return self.inner(*args, **kwargs)
        tensors = {**dict(self.inner.named_parameters()), **dict(self.inner.named_buffers())}
        upcast = {n: t.float() for n, t in tensors.items() if t.dtype in LOW_PRECISION}
        args, kwargs = _cast((args, kwargs), LOW_PRECISION, torch.float32)
        out = torch.func.functional_call(self.inner, upcast, tuple(args), dict(kwargs))
        return _cast(out, (torch.float32,), dtype)


# --------------------------------------------------------------------------- finding targets

Match = Callable[[nn.Module], bool]


def _walk(root: nn.Module, prefix: str, match: Match) -> Iterator[tuple[str, nn.Module]]:
    """Matching descendants of `root`, pre-order; a match's own descendants are skipped."""
    for name, child in root.named_children():
        qualified = f"{prefix}.{name}" if prefix else name
        if match(child):
            yield qualified, child
        else:
            yield from _walk(child, qualified, match)


def targets(encoder: Encoder, match: Match, final_norm: bool = False) -> list[tuple[str, Any]]:
    """(qualified name, module) of every match inside the blocks (and the final norm)."""
    names = {id(m): n for n, m in encoder.module.named_modules()}
    found: dict[int, tuple[str, nn.Module]] = {}
    for block in encoder.blocks:
        for name, module in _walk(block, names.get(id(block), ""), match):
            found.setdefault(id(module), (name, module))
    norm = encoder.final_norm
    if final_norm and norm is not None and match(norm):
        found.setdefault(id(norm), (names.get(id(norm), "final_norm"), norm))
    return list(found.values())


def _swap(encoder: Encoder, swaps: dict[int, nn.Module]) -> None:
    """Replace modules (by identity) wherever the module tree holds them."""
    for parent in list(encoder.module.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in swaps:
                setattr(parent, name, swaps[id(child)])
    if encoder.final_norm is not None and id(encoder.final_norm) in swaps:
        encoder.final_norm = swaps[id(encoder.final_norm)]


def nothing(name: str, why: str) -> VitportError:
    """The error of a fix that finds nothing to change."""
    return VitportError(f"fix '{name}' changed nothing: {why}")


def kinds(modules: Sequence[nn.Module]) -> str:
    return ", ".join(sorted({type(m).__name__ for m in modules}))


def replace_modules(
    encoder: Encoder,
    name: str,
    found: Sequence[tuple[str, nn.Module]],
    done: Callable[[nn.Module], bool],
    build: Callable[[nn.Module], nn.Module],
    already: str,
    did: Callable[[int, str, str], str],
) -> FixReport:
    """The skeleton of every fix that swaps modules: skip the `found` modules for which
    `done(module)` holds (they already compute what the fix would make them compute), swap the
    rest for `build(module)`, report what changed. `already` says, for "already ...: nothing to
    change", what the skipped modules are; `did(count, old kinds, new kinds)` the swap."""
    fresh = [(n, m) for n, m in found if not done(m)]
    kept = len(found) - len(fresh)
    if not fresh:
        names = kinds([m for _, m in found])
        return FixReport(
            name, 0, (), f"{already}: nothing to change ({count(kept, names + ' module')})"
        )
    swaps = {id(m): build(m) for _, m in fresh}
    _swap(encoder, swaps)
    detail = did(len(fresh), kinds([m for _, m in fresh]), kinds(list(swaps.values())))
    if kept:
        detail += f"; {kept} {already}"
    return FixReport(name, len(fresh), tuple(n for n, _ in fresh), detail)
