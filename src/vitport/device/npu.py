"""Ascend's torch_npu: importing it safely, saying why it does not import, and its own kernels.

torch_npu registers the ``npu`` device type and the ``torch.npu`` module when imported. A
torch_npu that is installed but broken (CANN not sourced, built for another torch) is hidden
from other libraries, and the reason kept for the one-line error.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from types import ModuleType
from typing import Any

import torch

from vitport.device.environment import dist_version
from vitport.errors import VitportError

__all__ = [
    "NPU_GELU",
    "TORCH_NPU_MISSING",
    "check_npu_gelu",
    "import_torch_npu",
    "npu_gelu",
    "npu_problem",
    "settle_torch_npu",
    "torch_npu_mismatch",
    "torch_npu_version",
]

TORCH_NPU_MISSING = (
    "device 'npu' needs torch_npu: pip install torch-npu matching your torch and CANN "
    "(see https://gitee.com/ascend/pytorch)"
)

NPU_GELU = "torch_npu.npu_gelu"
"""The NPU's own exact-GELU kernel, by name."""

CANN_LIBRARIES = ("libhccl.so", "libascendcl.so", "libacl", "libge_runner.so", "libruntime.so")

_HIDDEN: dict[str, str] = {}  # why torch_npu was hidden from other libraries, once it failed


def import_torch_npu() -> tuple[ModuleType | None, str | None]:
    """Import torch_npu (which registers the npu backend); return (module, why-not).

    A torch_npu that is installed but fails to import is then hidden (``sys.modules`` entry
    None): libraries that probe for it with ``find_spec`` and import it unguarded, as
    transformers does, see no torch_npu instead of crashing."""
    if sys.modules.get("torch_npu", False) is None and "torch_npu" in _HIDDEN:
        return None, _HIDDEN["torch_npu"]
    try:
        return importlib.import_module("torch_npu"), None
    except ImportError as exc:
        if getattr(exc, "name", None) == "torch_npu":
            return None, TORCH_NPU_MISSING
        return None, _hide_torch_npu(_torch_npu_broken(exc))
    except Exception as exc:  # a broken CANN install raises OSError, RuntimeError, ...
        return None, _hide_torch_npu(_torch_npu_broken(exc))


def _hide_torch_npu(why: str) -> str:
    for name in [n for n in sys.modules if n == "torch_npu" or n.startswith("torch_npu.")]:
        del sys.modules[name]
    sys.modules["torch_npu"] = None  # type: ignore[assignment]
    _HIDDEN["torch_npu"] = why
    return why


def settle_torch_npu() -> None:
    """Import an installed torch_npu now, as torch's autoload would, but without crashing."""
    if "torch_npu" not in sys.modules and importlib.util.find_spec("torch_npu") is not None:
        import_torch_npu()


def _torch_npu_broken(exc: BaseException) -> str:
    """One line for a torch_npu that is installed but does not import: what, and the cure."""
    reason = " ".join(str(exc).split("Please")[0].split())[:160] or type(exc).__name__
    mismatch = torch_npu_mismatch()
    if any(lib in str(exc) for lib in CANN_LIBRARIES):
        cure = (
            "CANN's libraries are not on the library path: run 'source set_env.sh' in your CANN "
            "installation (e.g. source /usr/local/Ascend/ascend-toolkit/set_env.sh) first"
        )
        if mismatch:
            cure += f"; also, {mismatch}"
    elif mismatch or "undefined symbol" in str(exc):
        cure = mismatch or (
            "torch_npu was built for another torch: install the torch-npu release that "
            f"matches torch {torch.__version__}"
        )
    else:
        cure = "check that CANN is installed and sourced, and that torch_npu matches your torch"
    return f"torch_npu is installed but does not import ({reason}): {cure}"


def torch_npu_mismatch() -> str | None:
    """'torch-npu X needs torch Y, this is torch Z; ...' when the installed pair disagrees."""
    try:
        from packaging.requirements import Requirement

        requires = importlib.metadata.requires("torch_npu") or []
    except (importlib.metadata.PackageNotFoundError, ImportError):
        return None
    installed = torch.__version__.split("+")[0]
    for line in requires:
        requirement = Requirement(line)
        if (
            requirement.name == "torch"
            and requirement.specifier
            and not (requirement.specifier.contains(installed, prereleases=True))
        ):
            return (
                f"torch-npu {dist_version('torch_npu')} is built for torch{requirement.specifier} "
                f"but this is torch {installed}: pip install 'torch{requirement.specifier}' (or "
                f"the torch-npu release built for torch {installed})"
            )
    return None


def npu_problem() -> str | None:
    """Why the NPU cannot be used although torch_npu is installed; None when it imports or
    when torch_npu is not installed at all."""
    try:
        importlib.metadata.version("torch_npu")
    except importlib.metadata.PackageNotFoundError:
        if importlib.util.find_spec("torch_npu") is None:
            return None
    module, why = import_torch_npu()
    return None if module is not None else why


def torch_npu_version() -> str:
    """The imported torch_npu's version, else the installed distribution's."""
    module = sys.modules.get("torch_npu")
    version = getattr(module, "__version__", None) if module is not None else None
    if version:
        return str(version)
    return dist_version("torch-npu")


# --------------------------------------------------------------------------- kernels


def _torch_npu_for_gelu() -> Any:
    try:
        return importlib.import_module("torch_npu")
    except ImportError as exc:
        raise VitportError(
            "the NPU GELU kernel needs torch_npu: pip install torch-npu matching your torch and CANN"
        ) from exc


def check_npu_gelu() -> None:
    """Raise :class:`VitportError` unless torch_npu imports and has its GELU kernel."""
    if not hasattr(_torch_npu_for_gelu(), "npu_gelu"):
        raise VitportError("torch_npu has no npu_gelu; upgrade torch-npu to use fix 'erf-gelu'")


def npu_gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU through the NPU's own kernel."""
    return _torch_npu_for_gelu().npu_gelu(x, approximate="none")
