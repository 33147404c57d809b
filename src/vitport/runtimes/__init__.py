"""Runtimes: the same Encoder run by torch, torch.compile, onnxruntime, OpenVINO, TensorRT or
torchair. Each is one `Runner` (see base.py) in a module of its own, listed in MODULES; the
result of `prepare` is an Encoder again, so that infer, bench, compare, embed and serve run and
time it like any other. Nothing outside a runner's module knows its runtime's API.

`prepare` is the one way every command gets the model it runs from a `Setup`: it refuses what
the runtime does not take before building anything, holds the rule "a runtime that runs an
export is built from the fp32 model and runs at the dtype" (`source_dtype`), applies fixes and
builds the runner's forward.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitport.cache import cache_root
from vitport.device import Device, dtype_name, parse_dtype, resolve_device
from vitport.errors import VitportError, one_line
from vitport.runtimes.base import RUNNERS, LimitError, Limits, Runner, Setup, runner

if TYPE_CHECKING:
    from vitport.encoder import Encoder

__all__ = [
    "MODULES",
    "RUNNERS",
    "LimitError",
    "Limits",
    "Prepared",
    "Runner",
    "Setup",
    "available",
    "cache_dir",
    "check",
    "fallback_note",
    "load",
    "prepare",
    "runner",
    "source_dtype",
]

MODULES = (
    "torch_runner",
    "compile_runner",
    "onnxruntime_runner",
    "openvino_runner",
    "tensorrt_runner",
    "torchair_runner",
)
"""The runner modules, in the order a search tries them; each registers its runner."""

for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")


def cache_dir() -> Path:
    """Where exports and engines are kept between runs."""
    return cache_root() / "runtimes"


def check(
    setup: Setup,
    device_type: str,
    batch_sizes: Iterable[int] | None = None,
    param: str = "batch_sizes",
) -> Runner:
    """The runner for `setup`, refused up front in one line where it is unknown, not installed,
    does not apply to the device type and dtype, or would be given a batch size beyond its
    declared limits (`param` names where those sizes came from)."""
    kind = runner(setup.runtime)
    reason = kind.refusal(device_type, setup)
    if reason:
        raise VitportError(reason)
    kind.limits.check_batches(setup.runtime, batch_sizes, param)
    return kind


def source_dtype(setup: Setup) -> str:
    """The dtype of the torch module a runtime is built from: fp32 for one that runs an export
    (the graph then runs at the setup's dtype), else the setup's dtype. The one home of that
    rule."""
    return "fp32" if RUNNERS.get(setup.runtime).exported else setup.dtype


@dataclass
class Prepared:
    """A model set up to run: the Encoder (its forward the runner's), how, and what it took."""

    encoder: Encoder
    setup: Setup
    runner: Runner
    build_seconds: float = 0.0
    fix_reports: list[Any] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # one line per change: fault, fixes, build
    ran_dtype: str = ""  # the dtype the runtime actually runs at (see Runner.ran_dtype)

    def __post_init__(self) -> None:
        self.ran_dtype = self.ran_dtype or self.setup.dtype

    @property
    def fell_back(self) -> bool:
        """The runtime runs another precision than the setup asked for."""
        return self.ran_dtype != self.setup.dtype

    @property
    def ran_setup(self) -> Setup:
        """The setup as it actually runs: the one to label and judge it by."""
        return replace(self.setup, dtype=self.ran_dtype)

    def release(self) -> None:
        """Let go of what the runner built (sessions, engines, compiled graphs)."""
        self.runner.release()


def prepare(
    encoder: Encoder,
    setup: Setup,
    device: Device | None = None,
    *,
    fault: str | None = None,
    cache: Path | None = None,
    copy: bool = True,
) -> Prepared:
    """`encoder` set up as `setup` asks on `device` (default: its own): a copy (unless
    `copy=False`) in the source dtype (see `source_dtype`), with the planted `fault` (if any)
    and the setup's fixes applied, run by the setup's runtime. `encoder` itself is left as it
    is when copied. Refused in one line, before anything is built, where the runtime is
    missing or does not take the setup."""
    from vitport.faults import inject
    from vitport.fixes import apply_fixes

    device = device or encoder.device
    kind = check(setup, device.type)
    notes = list(encoder.notes)
    source = parse_dtype(source_dtype(setup))
    if kind.exported and next(encoder.module.parameters()).dtype != torch.float32:
        notes.append(f"{setup.runtime} was built from weights already rounded to a lower dtype")
    candidate = encoder.to(device, source, copy=copy)
    changes = [inject(candidate, fault)] if fault else []
    if fault and not setup.torch_runtime:  # the export cache knows weights and fixes only
        candidate.weights_sha256 += f"+{fault}"
    reports = apply_fixes(candidate, [f for f in setup.fixes if f not in candidate.fixes])
    changes += [r.detail for r in reports]
    candidate = replace(candidate, dtype=parse_dtype(setup.dtype))
    began = time.perf_counter()
    try:
        forward = kind.build(candidate, setup, cache or cache_dir())
    except VitportError:
        raise
    except Exception as exc:  # an unsupported operator, a missing library, out of memory
        raise VitportError(
            f"{setup.runtime} could not build {candidate.spec}: {one_line(exc, typed=True)}"
        ) from exc
    seconds = time.perf_counter() - began
    if not setup.torch_runtime:
        notes.append(f"runtime: {setup.runtime} (built in {seconds:.1f} s)")
        changes.append(f"run by {setup.runtime} (built in {seconds:.1f} s)")
    ran = kind.ran_dtype() or setup.dtype
    if ran != setup.dtype:  # labelled by what it runs: bench and search show the ran dtype
        notes.append(fallback_note(setup, ran))
        changes.append(f"{setup.runtime} ran {ran} ({setup.dtype} asked)")
        candidate = replace(candidate, dtype=parse_dtype(ran))
    built = replace(candidate, forward_fn=forward, runtime=setup.runtime, notes=notes)
    return Prepared(built, setup, kind, seconds, reports, changes, ran)


def fallback_note(setup: Setup, ran: str) -> str:
    """One line for a runtime that runs another precision than it was asked for."""
    return (
        f"{setup.runtime} was asked for {setup.dtype} and runs {ran} here (the precision its "
        f"built model reports: no {setup.dtype} support in {setup.runtime} on this device); "
        f"its speed is {ran}'s"
    )


def load(
    spec: str, device: str | Device, setup: Setup, *, cache: Path | None = None, **load_options
) -> Prepared:
    """Load `spec` on `device` for `setup` (checked first: nothing loads for a runtime that is
    missing or does not apply) and prepare it: the one way every command gets its model."""
    import vitport

    target = device if isinstance(device, Device) else resolve_device(device)
    check(setup, target.type)
    # the setup's fixes are prepare's to apply (a port's own were settled into the setup)
    encoder = vitport.load(spec, target, source_dtype(setup), fixes=(), **load_options)
    return prepare(encoder, setup, cache=cache, copy=False)


def available(
    device_type: str, dtypes: Sequence[str], names: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """The runtimes a search tries (installed, and applying to the device in one of `dtypes`),
    and one line for each one skipped, saying why."""
    chosen, skipped = [], []
    wanted = [dtype_name(parse_dtype(d)) for d in dtypes]
    for name in RUNNERS.parse(names) if names else RUNNERS.names():
        kind = runner(name)
        reasons = [kind.not_applicable(device_type, d) for d in wanted]
        reason = kind.missing() or (reasons[0] if all(reasons) else None)
        if reason:
            skipped.append(reason)
        else:
            chosen.append(name)
    return chosen, skipped
