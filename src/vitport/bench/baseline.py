"""An earlier bench run to measure against: read it, and refuse one that measured something else."""

from __future__ import annotations

import json
from pathlib import Path

from vitport.bench.run import BenchResult
from vitport.device import dtype_name, parse_dtype
from vitport.errors import VitportError


def read_baseline(path: Path) -> BenchResult:
    """A `vitport bench --json` file, or one clear error."""
    try:
        return BenchResult.from_dict(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise VitportError(
            f"baseline {path} not found; write one with vitport bench --json"
        ) from exc
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise VitportError(
            f"{path} is not a vitport bench --json file ({type(exc).__name__}: {exc})"
        ) from exc


def check_baseline(
    old: BenchResult, path: Path, spec: str, dtype: str, attention: str, compiled: bool
) -> None:
    """Regressions mean something only between runs of the same model and settings."""
    theirs = (old.spec, old.dtype, old.attention, old.compiled)
    ours = (spec, dtype_name(parse_dtype(dtype)), attention, compiled)
    if theirs != ours:
        raise VitportError(
            f"baseline {path} measured {theirs}, this run is {ours} "
            "(model, dtype, attention, compiled); compare like with like"
        )
