"""The one shape of a runtime, and the one record of how a model is set up to run.

In the manner of Polygraphy's ``backend/*/runner.py``: every runtime is one `Runner` class in a
module of its own, registered in `RUNNERS`. Before it builds anything, a runner says whether it
is installed and applies to a device and dtype (and if not, why), and declares its `Limits`
(devices, dtypes, batch range, attention settings). `build` makes a forward from an Encoder and
a `Setup`; `release` lets go of what the build holds (a session, an engine, compiled graphs).

`Setup` is the frozen record of a configuration (runtime, dtype, attention, compiled, fixes):
what bench measured, what optimize tried, what a comparison's candidate ran.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from vitport import records
from vitport.errors import VitportError
from vitport.registry import Registry, normalize

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitport.encoder import Encoder, RawOutput

Forward = Callable[["nn.Module", "torch.Tensor"], "RawOutput"]
"""What a runner builds: the Encoder's forward_fn, (module, pixels) -> RawOutput."""

ATTENTIONS = ("default", "eager", "sdpa", "flash")  # the torch attention settings
TORCH_DEVICES = ("cpu", "cuda", "npu", "mps", "xpu")
DTYPES = ("fp32", "bf16", "fp16")


class LimitError(VitportError):
    """A value beyond what a runtime declares it takes. `param` names the parameter, `limit`
    the bound it broke."""

    def __init__(self, message: str, param: str, limit: object) -> None:
        self.param, self.limit = param, limit
        super().__init__(message, params=(param,))


@dataclass(frozen=True)
class Limits:
    """What a runtime takes, declared before it builds anything."""

    devices: tuple[str, ...]  # device types it runs on
    dtypes: tuple[str, ...]  # the dtypes it runs at
    min_batch: int = 1
    max_batch: int | None = None  # None: as large as the device's memory allows
    attentions: tuple[str, ...] = ("default",)  # attention settings it honours

    def batch_range(self) -> str:
        return f"{self.min_batch} to {self.max_batch}" if self.max_batch else f"{self.min_batch}+"

    def check_batch(self, runtime: str, batch_size: int, param: str = "batch_size") -> None:
        """Refuse a batch size outside the declared range, in one line naming `param`."""
        if batch_size < self.min_batch:
            raise LimitError(
                f"{param} {batch_size} is below what {runtime} takes (batches of "
                f"{self.batch_range()}); choose at least {self.min_batch}",
                param,
                self.min_batch,
            )
        if self.max_batch is not None and batch_size > self.max_batch:
            raise LimitError(
                f"{param} {batch_size} is beyond what {runtime} takes (batches of "
                f"{self.batch_range()}); choose at most {self.max_batch}",
                param,
                self.max_batch,
            )

    def check_batches(
        self, runtime: str, batch_sizes: Iterable[int] | None, param: str = "batch_sizes"
    ) -> None:
        for batch in batch_sizes or ():
            self.check_batch(runtime, batch, param)

    def cap(self, batch: int) -> int:
        """`batch`, or the largest batch this runtime takes where that is smaller."""
        return min(batch, self.max_batch) if self.max_batch else batch


class Runner(Protocol):
    """One runtime. Subclass it (the defaults below serve most runtimes), declare `name`,
    `limits` and, where the runtime runs an export, `exported`; implement `build`."""

    name: ClassVar[str]
    limits: ClassVar[Limits]
    exported: ClassVar[bool] = False  # builds from the fp32 model's export, runs at the dtype
    packages: ClassVar[tuple[str, ...]] = ()  # what must be importable
    install: ClassVar[str] = ""  # the command that installs them

    def missing(self) -> str | None:
        """Why it is not installed, with the cure; None when it is."""
        absent = [p for p in self.packages if importlib.util.find_spec(p) is None]
        if absent:
            return f"{self.name} needs {', '.join(absent)}: {self.install}"
        return None

    def not_applicable(self, device_type: str, dtype: str) -> str | None:
        """Why it does not apply to this device type and dtype; None when it does."""
        if device_type not in self.limits.devices:
            return f"{self.name} runs on {', '.join(self.limits.devices)}, not {device_type}"
        if dtype not in self.limits.dtypes:
            return f"{self.name} runs {', '.join(self.limits.dtypes)}, not {dtype}"
        return None

    def refusal(self, device_type: str, setup: Setup) -> str | None:
        """Why `setup` cannot run on this device type: not installed, not applicable, or an
        attention setting this runtime does not honour; None when it can."""
        reason = self.missing() or self.not_applicable(device_type, setup.dtype)
        if reason is None and setup.attention not in self.limits.attentions:
            reason = (
                f"{self.name} runs its own graph; attention {setup.attention!r} applies to "
                f"{', '.join(n for n, r in RUNNERS.items() if setup.attention in r.limits.attentions)}"
            )
        return reason

    def build(self, encoder: Encoder, setup: Setup, cache: Path) -> Forward:
        """The forward that runs `encoder` (in fp32 where `exported`, else at the setup's
        dtype, fixes applied) as `setup` asks. `cache` holds exports and engines."""
        ...

    def release(self) -> None:
        """Let go of what `build` made (sessions, engines, compiled graphs)."""
        return None

    def ran_dtype(self) -> str | None:
        """The dtype the built runtime actually runs at, read from what `build` made, for a
        runtime that may fall back to another precision than the setup asked for (OpenVINO
        asked for bf16 on a CPU without bf16 runs f32); None: as asked, or unknown."""
        return None


RUNNERS: Registry[type[Runner]] = Registry("runtime", "runtime")
"""Every runtime, by name; each module under vitport.runtimes registers its own."""


def runner(name: str) -> Runner:
    """A fresh runner of runtime `name` (UnknownNameError, naming `runtime`, if none)."""
    return RUNNERS.get(name)()


@dataclass(frozen=True)
class Setup:
    """How a model is set up to run: by which runtime, at which dtype, with which attention,
    compiled or not, with which precision fixes. Names are normalised on construction.

    `compiled` and the runtime "compile" say the same thing (torch.compile on the torch
    module): either spelling gives runtime "compile" and compiled True.
    """

    runtime: str = "torch"
    dtype: str = "fp32"
    attention: str = "default"
    compiled: bool = False
    fixes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        from vitport.device import dtype_name, parse_dtype

        runtime = normalize(self.runtime)
        if self.compiled and runtime not in ("torch", "compile"):
            raise VitportError(
                f"compiled=True applies to the torch runtime; runtime={runtime} builds its own "
                "graph",
                params=("compiled=True", "runtime="),
            )
        if runtime == "torch" and self.compiled:
            runtime = "compile"
        if self.attention not in ATTENTIONS:
            raise VitportError(
                f"attention={self.attention} is unknown; choose one of {', '.join(ATTENTIONS)}",
                params=("attention=",),
            )
        object.__setattr__(self, "runtime", runtime)
        object.__setattr__(self, "compiled", runtime == "compile")
        object.__setattr__(self, "dtype", dtype_name(parse_dtype(self.dtype)))
        object.__setattr__(self, "fixes", tuple(self.fixes))

    @property
    def torch_runtime(self) -> bool:
        """Run by the torch module itself (eager or compiled), not by another runtime."""
        return self.runtime in ("torch", "compile")

    def label(self) -> str:
        """A short row label: "bf16 sdpa compiled", "fp32 default", "bf16 openvino"."""
        if not self.torch_runtime:
            return f"{self.dtype} {self.runtime}"
        return f"{self.dtype} {self.attention}{' compiled' if self.compiled else ''}"

    @property
    def cost_kind(self) -> str:
        """What dominates the time to try it: eager runs, a runtime build, or compilation."""
        if self.compiled:
            return "compiled"
        return "eager" if self.runtime == "torch" else "built"

    def to_dict(self) -> dict[str, Any]:
        return records.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Setup:
        return records.from_dict(cls, data)
