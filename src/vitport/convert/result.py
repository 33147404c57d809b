"""The records of a conversion: the source being converted and the result that conversion.json
holds (every target, the layouts and ONNX alike, returns one)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitport.errors import VitportError

if TYPE_CHECKING:
    import torch

    from vitport.convert.layouts import Preprocessing
    from vitport.convert.verify import Check
    from vitport.encoder import Architecture, Encoder

SCHEMA_VERSION = 1


class VerificationFailed(VitportError):
    """The converted model does not compute its source's function; nothing was written."""

    exit_code = 1

    def __init__(self, message: str, result: ConversionResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Source:
    """A checkpoint to convert: its tensors in its own layout, and the function it computes."""

    spec: str
    layout: str
    arch: Architecture | None  # None: a model vitport loads but does not convert between layouts
    state: dict[str, torch.Tensor]
    load_function: Callable[[], Encoder]  # the source's own function, independent of the tables
    sha256: str
    preprocessing: Preprocessing
    processor_file: Path | None = None
    _function: Encoder | None = None

    @property
    def function(self) -> Encoder:
        """Loaded on first use, so that a source that does not fit its table fails before."""
        if self._function is None:
            self._function = self.load_function()
        return self._function


@dataclass
class ConversionResult:
    source: str
    source_sha256: str
    source_layout: str
    target: str
    out: str
    family: str
    arch: dict[str, Any]
    table: str = ""
    table_version: int = 0
    dropped: dict[str, str] = field(default_factory=dict)
    filled: dict[str, str] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    image_size: int = 0
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    resampled: dict[str, Any] | None = None  # from_grid, to_grid: --image-size resampled it

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def same_function(self) -> bool:
        """Verified, and the checkpoint's own function: its position embeddings not resampled."""
        return self.passed and self.resampled is None

    def to_dict(self) -> dict[str, Any]:
        from vitport import __version__

        return {
            "schema_version": SCHEMA_VERSION,
            "vitport_version": __version__,
            "source": {
                "path": self.source,
                "sha256": self.source_sha256,
                "layout": self.source_layout,
            },
            "target": {"layout": self.target, "path": self.out, "files": self.files},
            "family": self.family,
            "arch": self.arch,
            "mapping": {"table": self.table, "version": self.table_version},
            "dropped": self.dropped,
            "filled": self.filled,
            "verification": {
                "inputs": self.inputs,
                "image_size": self.image_size,
                "dtype": "fp32",
                "passed": self.passed,
                "checks": [c.to_dict() for c in self.checks],
            },
            "function": "same" if self.resampled is None else "resampled",
            "resampled": self.resampled,
            "notes": self.notes,
        }
