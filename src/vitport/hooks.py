"""Forward hooks and teacher forcing, written once.

`hooked` installs forward hooks for the length of a `with` block and removes them however it
ends. `teacher_force` runs one module on the input another run gave it and adds its error
against that run's output. Localisation, a golden file's block states, convert's proof and the
HF classifier forward use them; nothing else registers a hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from vitport.encoder import Encoder

BeforeHook = Callable[[nn.Module, tuple, dict], None]
"""Called as hook(module, args, kwargs) before a module's forward."""
AfterHook = Callable[[nn.Module, tuple, dict, Any], None]
"""Called as hook(module, args, kwargs, output) after a module's forward."""


@contextmanager
def hooked(
    after: Iterable[tuple[nn.Module, AfterHook]] = (),
    before: Iterable[tuple[nn.Module, BeforeHook]] = (),
) -> Iterator[None]:
    """Forward hooks on modules while the block runs: `after` ones see the output, `before`
    ones only the call. All see the keyword arguments; all are removed when the block ends."""
    handles = []
    try:
        for module, hook in before:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        for module, hook in after:
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def hooked_forward(
    encoder: Encoder,
    pixels: torch.Tensor,
    on_input: Callable[[int, tuple, dict], None],
    on_output: Callable[[int, Any], None],
) -> None:
    """One forward with `on_input(index, args, kwargs)` before and `on_output(index, output)`
    after every block."""
    before = [
        (block, lambda _m, args, kwargs, i=index: on_input(i, args, kwargs))
        for index, block in enumerate(encoder.blocks)
    ]
    after = [
        (block, lambda _m, _args, _kwargs, output, i=index: on_output(i, output))
        for index, block in enumerate(encoder.blocks)
    ]
    with hooked(after, before), torch.inference_mode():
        encoder.forward_fn(encoder.module, pixels.to(encoder.device.torch_device, encoder.dtype))


@dataclass
class ErrorSum:
    """Running sums for mean|Δ| / mean|ref| and the largest |Δ| over many batches."""

    diff: float = 0.0
    ref: float = 0.0
    max_abs: float = 0.0

    def add(self, ref: torch.Tensor, out: torch.Tensor) -> None:
        ref64, out64 = ref.detach().double().cpu(), out.detach().double().cpu()
        delta = (out64 - ref64).abs()
        self.diff += float(delta.sum())
        self.ref += float(ref64.abs().sum())
        self.max_abs = max(self.max_abs, float(delta.max()) if delta.numel() else 0.0)

    @property
    def rel_error(self) -> float:
        if self.ref == 0:
            return 0.0 if self.diff == 0 else float("inf")
        return self.diff / self.ref


def teacher_force(
    module: nn.Module, args: tuple, kwargs: dict, expected: torch.Tensor, errors: ErrorSum
) -> None:
    """Run `module` on the input another run gave its twin and add its error against the
    output the twin gave (`expected`): the module's own error, not what came before it."""
    errors.add(expected, first_tensor(module(*args, **kwargs)))


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in a (nested) call or output: a block's hidden states."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def replace_first_tensor(value: Any, tensor: torch.Tensor) -> Any:
    """The same (nested) output with its first tensor replaced by `tensor`."""
    if isinstance(value, torch.Tensor):
        return tensor
    if isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            if first_tensor(item) is not None:
                items = list(value)
                items[index] = replace_first_tensor(item, tensor)
                return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        for key, item in value.items():
            if first_tensor(item) is not None:
                value[key] = replace_first_tensor(item, tensor)  # ModelOutput: set in place
                return value
    return value


def move(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Tensors to the candidate's device; floating ones to its dtype; structure kept."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, tuple):
        return tuple(move(v, device, dtype) for v in value)
    if isinstance(value, list):
        return [move(v, device, dtype) for v in value]
    if isinstance(value, dict):
        return {k: move(v, device, dtype) for k, v in value.items()}
    return value


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same call with its hidden-states tensor (the first tensor argument) replaced."""
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return args, {**kwargs, key: hidden}
    return (hidden, *args), kwargs
