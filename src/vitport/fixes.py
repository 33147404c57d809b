"""Numerical fixes for a port: small module swaps and settings that make a backend exact.

Each fix finds its targets from the model's structure (module types, never attribute
names), changes them in place, and reports what it changed. A fix that finds nothing to
change raises :class:`VitportError`, so a fix that does not apply never passes silently.

Fixes mutate ``encoder.module`` (and ``encoder.final_norm``/``encoder.forward_fn``) in
place; callers that need the original keep a copy first (``encoder.to(copy=True)``).
``no-tf32`` changes process-wide torch settings, not the encoder.

Device-specific kernels and switches (the NPU's GELU, HF32) come from :mod:`vitport.device`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from vitport.device.dtypes import dtype_name
from vitport.device.npu import NPU_GELU, npu_gelu
from vitport.device.precision import ABSENT, STRICT_SETTINGS
from vitport.encoder import Encoder, RawOutput, is_norm
from vitport.errors import VitportError

__all__ = [
    "FIXES",
    "ExactGELU",
    "FP32Attention",
    "FP32LayerNorm",
    "FP32Norm",
    "FP32RMSNorm",
    "Fix",
    "FixReport",
    "SDPAForward",
    "apply_fixes",
    "fix_names",
    "parse_fixes",
]

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
    """A named fix: what it does, and the function that applies it to an encoder."""

    name: str
    help: str
    apply: Callable[[Encoder], FixReport]


# --------------------------------------------------------------------------- replacements


class ExactGELU(nn.Module):
    """GELU with the exact erf formula; on an NPU through the NPU's own kernel.

    The kernel is chosen when the fix is applied, from the encoder's device: apply the fix
    after moving the encoder (re-applying refreshes the choice).
    """

    def __init__(self, npu: bool = False) -> None:
        super().__init__()
        self.npu = npu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.npu:
            return npu_gelu(x)
        return F.gelu(x, approximate="none")

    def extra_repr(self) -> str:
        return f"npu={self.npu}"


def _share(owner: nn.Module, name: str, param: Any) -> None:
    """Register `param` (the original module's Parameter, or None) under `name`."""
    if isinstance(param, nn.Parameter) or param is None:
        owner.register_parameter(name, param)
    else:  # a plain tensor attribute: keep it as a buffer
        owner.register_buffer(name, param)


class FP32LayerNorm(nn.Module):
    """LayerNorm computed in float32 with the original's parameters and eps, cast back.

    Shares the original Parameters, so the state-dict keys stay what they were.
    """

    def __init__(self, shape: Sequence[int], eps: float, weight: Any, bias: Any) -> None:
        super().__init__()
        self.normalized_shape = tuple(int(s) for s in shape)
        self.eps = float(eps)
        _share(self, "weight", weight)
        _share(self, "bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class FP32RMSNorm(nn.Module):
    """RMSNorm ``x * rsqrt(mean(x^2) + eps) * w`` in float32, cast back to the input dtype."""

    def __init__(self, shape: Sequence[int], eps: float, weight: Any) -> None:
        super().__init__()
        self.normalized_shape = tuple(int(s) for s in shape)
        self.eps = float(eps)
        _share(self, "weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        h = x.float()
        out = h * torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + self.eps)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


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


class FP32Attention(RunInFP32):
    """An attention module run in float32 (scores, softmax and projections)."""


class FP32Norm(RunInFP32):
    """A norm of a type vitport has no formula for, run in float32 with its own forward."""


class SDPAForward:
    """An encoder forward that runs inside ``sdpa_kernel``, limited to one SDPA backend
    (named as in ``torch.nn.attention.SDPBackend``: "MATH", "FLASH_ATTENTION", ...)."""

    def __init__(self, inner: Callable[[nn.Module, torch.Tensor], RawOutput], backend: str) -> None:
        self.inner = inner
        self.backend = backend

    def __call__(self, module: nn.Module, pixels: torch.Tensor) -> RawOutput:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, self.backend)]):
            return self.inner(module, pixels)

    def __repr__(self) -> str:
        inner = getattr(self.inner, "__qualname__", repr(self.inner))
        return f"SDPAForward({inner}, {self.backend})"


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


def _targets(encoder: Encoder, match: Match, final_norm: bool = False) -> list[tuple[str, Any]]:
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


def _nothing(name: str, why: str) -> VitportError:
    return VitportError(f"fix '{name}' changed nothing: {why}")


def _kinds(modules: Sequence[nn.Module]) -> str:
    return ", ".join(sorted({type(m).__name__ for m in modules}))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _replace_modules(
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
        kinds = _kinds([m for _, m in found])
        return FixReport(name, 0, (), f"{already}: nothing to change ({kept} {kinds} modules)")
    swaps = {id(m): build(m) for _, m in fresh}
    _swap(encoder, swaps)
    detail = did(len(fresh), _kinds([m for _, m in fresh]), _kinds(list(swaps.values())))
    if kept:
        detail += f"; {kept} {already}"
    return FixReport(name, len(fresh), tuple(n for n, _ in fresh), detail)


# --------------------------------------------------------------------------- erf-gelu


def _is_gelu(module: nn.Module) -> bool:
    return isinstance(module, nn.GELU) or "gelu" in type(module).__name__.lower()


def _is_activation(module: nn.Module) -> bool:
    return "activation" in type(module).__module__


@torch.no_grad()
def _computes_exact_gelu(module: nn.Module, device: Any) -> bool:
    """Whether a GELU module already computes the exact erf GELU on `device`, a vitport
    Device (tanh and sigmoid
    approximations miss it by 1e-4 and more; float32 rounding stays far below 1e-5)."""
    x = torch.linspace(-6.0, 6.0, 1201)
    want = F.gelu(x.double(), approximate="none").float()
    try:
        got = module(x.to(device.torch_device)).float().cpu()
    except Exception:  # cannot run it here: leave the judgement to the swap
        return False
    return got.shape == want.shape and bool((got - want).abs().max() <= 1e-5)


def _erf_gelu(encoder: Encoder) -> FixReport:
    found = _targets(encoder, _is_gelu)
    if not found:
        acts = [m for b in encoder.blocks for m in b.modules() if _is_activation(m)]
        uses = f"its activations: {_kinds(acts)}" if acts else "no activation modules"
        raise _nothing(
            "erf-gelu",
            f"this model has no GELU module in its blocks ({uses}); the fix does not apply",
        )
    backend_kernel = encoder.device.exact_gelu_kernel()
    npu = backend_kernel is not None
    for _, module in found:
        if isinstance(module, ExactGELU):
            module.npu = npu
    kernel = backend_kernel or "torch.nn.functional.gelu"

    def exact(module: nn.Module) -> bool:
        return isinstance(module, ExactGELU) or _computes_exact_gelu(module, encoder.device)

    return _replace_modules(
        encoder,
        "erf-gelu",
        found,
        exact,
        lambda _: ExactGELU(npu),
        already="already exact",
        did=lambda n, old, _: (
            f"replaced {_plural(n, 'GELU module')} ({old}) "
            f"with exact erf GELU ({kernel} approximate='none')"
        ),
    )


# --------------------------------------------------------------------------- layernorm-fp32

FP32_NORMS = (FP32LayerNorm, FP32RMSNorm, FP32Norm)


def _is_norm(module: nn.Module) -> bool:
    """A norm, or one this fix made already (an FP32Norm holds no weight of its own)."""
    return isinstance(module, FP32_NORMS) or is_norm(module)


def _eps(module: nn.Module) -> float:
    for attr in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return torch.finfo(torch.float32).eps  # nn.RMSNorm(eps=None) uses the dtype's eps


def _shape(module: nn.Module) -> tuple[int, ...]:
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        return tuple(shape) if isinstance(shape, Sequence) else (int(shape),)
    return tuple(module.weight.shape)


def _layer_norm(module: nn.Module) -> nn.Module:
    return FP32LayerNorm(_shape(module), _eps(module), module.weight, module.bias)


def _rms_norm(module: nn.Module) -> nn.Module:
    return FP32RMSNorm(_shape(module), _eps(module), getattr(module, "weight", None))


NORM_FORMULAS: tuple[tuple[Match, Callable[[nn.Module], nn.Module]], ...] = (
    (lambda m: isinstance(m, nn.LayerNorm), _layer_norm),
    (lambda m: isinstance(m, nn.RMSNorm) or "rmsnorm" in type(m).__name__.lower(), _rms_norm),
)
"""Norm kinds vitport computes by formula; any other norm runs its own forward in fp32."""


@torch.no_grad()
def _agrees(original: nn.Module, formula: nn.Module) -> bool:
    """Whether the formula computes what the module does (within low-precision error).

    Guards against subclasses with other semantics (channels-first LayerNorm2d, Gemma's
    ``1 + weight``); a module that merely computes in low precision still agrees.
    """
    try:
        weight = next(iter(original.parameters()), None)
        where = {"device": weight.device} if weight is not None else {}
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, *formula.normalized_shape, generator=gen).to(**where)
        if weight is not None:
            x = x.to(weight.dtype)
        want, got = original(x).float(), formula(x).float()
    except Exception:
        return False
    if want.shape != got.shape:
        return False
    return bool((want - got).norm() <= 0.02 * want.norm() + 1e-6)


def _fp32_norm(module: nn.Module) -> nn.Module:
    for match, build in NORM_FORMULAS:
        if match(module):
            formula = build(module)
            if _agrees(module, formula):
                return formula
    return FP32Norm(module)


@torch.no_grad()
def _computes_in_fp32(module: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a norm gives, bit for bit, what its float32 replacement would in this run's
    dtype (a norm of a float32 model does; one computing in bf16 inside it does not)."""
    if isinstance(module, FP32_NORMS):
        return True
    replacement = _fp32_norm(module)
    shape = getattr(replacement, "normalized_shape", None) or _shape(module)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *shape, generator=gen).to(device=device, dtype=dtype)
    try:
        return bool(torch.equal(module(x), replacement(x)))
    except Exception:  # cannot run it here: leave the judgement to the swap
        return False


def _layernorm_fp32(encoder: Encoder) -> FixReport:
    found = _targets(encoder, _is_norm, final_norm=True)
    if not found:
        raise _nothing("layernorm-fp32", "no norm module found in the blocks or the final norm")
    dtype, where = encoder.dtype, encoder.device.torch_device
    return _replace_modules(
        encoder,
        "layernorm-fp32",
        found,
        lambda m: _computes_in_fp32(m, dtype, where),
        _fp32_norm,
        already="already float32",
        did=lambda n, old, new: (
            f"replaced {_plural(n, 'norm module')} ({old}) with float32 norms ({new})"
        ),
    )


# --------------------------------------------------------------------------- attention-fp32


def _is_attention(module: nn.Module) -> bool:
    return (
        isinstance(module, (nn.MultiheadAttention, FP32Attention))
        or "attention" in type(module).__name__.lower()
    )


def _attention_fp32(encoder: Encoder) -> FixReport:
    found = _targets(encoder, _is_attention)
    if not found:
        raise _nothing("attention-fp32", "no attention module found in the blocks")
    wide = encoder.dtype not in LOW_PRECISION  # the wrapper would run them unchanged

    def done(module: nn.Module) -> bool:
        return wide or isinstance(module, FP32Attention)

    return _replace_modules(
        encoder,
        "attention-fp32",
        found,
        done,
        FP32Attention,
        already=f"already float32 (the model runs in {dtype_name(encoder.dtype)})",
        did=lambda n, old, _: (
            f"wrapped {_plural(n, 'attention module')} ({old}) "
            "to run in float32 (inputs and weights upcast, output cast back)"
        ),
    )


# --------------------------------------------------------------------------- math-sdpa


def _sdpa_unused(encoder: Encoder) -> str:
    """Why this model never calls SDPA, so its backend cannot matter ("" when it does)."""
    config = getattr(encoder.module, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in (None, "sdpa"):
        return f"the model uses {impl!r} attention"
    fused = [m.fused_attn for b in encoder.blocks for m in b.modules() if hasattr(m, "fused_attn")]
    if fused and not any(fused):
        return "the timm attention is not fused, fused_attn=False"
    return ""


def _math_sdpa(encoder: Encoder) -> FixReport:
    target = ("forward_fn",)
    forward = encoder.forward_fn
    if isinstance(forward, SDPAForward) and forward.backend == "MATH":
        return FixReport(
            "math-sdpa", 0, (), "already math SDPA: nothing to change (the forward runs with it)"
        )
    unused = _sdpa_unused(encoder)
    if unused:
        return FixReport("math-sdpa", 0, (), f"SDPA not called: nothing to change ({unused})")
    encoder.forward_fn = SDPAForward(encoder.forward_fn, "MATH")
    return FixReport("math-sdpa", 1, target, "forward runs with SDPA math backend")


# --------------------------------------------------------------------------- no-tf32


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


def _no_tf32(encoder: Encoder) -> FixReport:
    present = [(s, s.get()) for s in STRICT_SETTINGS]
    present = [(s, before) for s, before in present if before is not ABSENT]
    for setting, before in present:
        if before != setting.strict:
            setting.put(setting.strict)
    flipped = tuple(s.name for s, before in present if s.get() != before)
    if flipped:
        detail = f"set {_plural(len(flipped), 'process-wide setting')} strict: {', '.join(flipped)}"
    else:
        detail = f"already strict: nothing to change (all {_plural(len(present), 'setting')} were)"
    return FixReport("no-tf32", len(flipped), flipped, detail)


# --------------------------------------------------------------------------- registry

FIXES: dict[str, Fix] = {
    fix.name: fix
    for fix in (
        Fix(
            "erf-gelu",
            f"replace every GELU in the blocks with exact erf GELU ({NPU_GELU} on NPU)",
            _erf_gelu,
        ),
        Fix(
            "layernorm-fp32",
            "compute every norm (LayerNorm, RMSNorm, ...) in float32, cast back",
            _layernorm_fp32,
        ),
        Fix(
            "attention-fp32",
            "run every attention module in float32 (scores, softmax, projections)",
            _attention_fp32,
        ),
        Fix(
            "math-sdpa",
            "run the forward with the math backend of scaled_dot_product_attention",
            _math_sdpa,
        ),
        Fix(
            "no-tf32",
            "turn off TF32/HF32 and reduced-precision reductions (process-wide settings)",
            _no_tf32,
        ),
    )
}
"""Every fix, in the order ``all`` applies them."""


def fix_names() -> list[str]:
    """Names of every fix, in registry order."""
    return list(FIXES)


def _unknown(name: str) -> VitportError:
    return VitportError(f"unknown fix '{name}'; valid fixes: {', '.join(FIXES)}, or all")


def parse_fixes(text: str | Sequence[str] | None) -> list[str]:
    """``"erf-gelu,layernorm-fp32"`` (or a list of such) -> fix names; ``"all"`` -> every fix.

    Order is kept, duplicates dropped, underscores read as hyphens.
    """
    if text is None:
        return []
    items = [text] if isinstance(text, str) else list(text)
    names: list[str] = []
    for item in items:
        for raw in str(item).split(","):
            name = raw.strip().lower().replace("_", "-")
            if not name:
                continue
            if name == "all":
                expanded = fix_names()
            elif name in FIXES:
                expanded = [name]
            else:
                raise _unknown(raw.strip())
            names.extend(n for n in expanded if n not in names)
    return names


def apply_fixes(encoder: Encoder, names: Sequence[str]) -> list[FixReport]:
    """Apply the named fixes in order, mutating `encoder` in place; one report per fix.

    Raises :class:`VitportError` for an unknown name or a fix that finds no target.
    """
    unknown = [n for n in names if n not in FIXES]
    if unknown:
        raise _unknown(unknown[0])
    reports = [FIXES[name].apply(encoder) for name in names]
    encoder.fixes.extend(n for n in names if n not in encoder.fixes)
    return reports
