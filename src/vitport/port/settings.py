"""What loading a port runs at: its own dtype and fixes (from `vitport.json`) unless the caller
gives others, and the one note that says which applied.

`vitport.families.find_port(spec)` reads a spec's manifest before anything loads, so that a
command can settle its dtype, fixes and reference first; `port_settings` settles them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vitport.port.manifest import Manifest

LIBRARY_OVERRIDE = "pass dtype=/fixes= to override"
CLI_OVERRIDE = "give --dtype/--fix to override"


@dataclass(frozen=True)
class PortSettings:
    """The dtype name and fixes a load runs at, and the note saying where they came from ("" for
    a model that is no port)."""

    dtype: str
    fixes: tuple[str, ...]
    note: str = ""
    from_port: bool = False  # the port's own dtype or fixes (or both) apply


def port_settings(
    manifest: Manifest | None,
    dtype: str | torch.dtype | None = None,
    fixes: Sequence[str] | None = None,
    override: str = LIBRARY_OVERRIDE,
) -> PortSettings:
    """`dtype` and `fixes` as given; where None, the port's own, else fp32 and no fixes. The note
    names what came from vitport.json and what was given over it; `override` is how the caller
    gives its own (the library's parameters or the CLI's flags)."""
    from vitport.device import dtype_name, parse_dtype
    from vitport.fixes import parse_fixes

    given_dtype = None if dtype is None else dtype_name(parse_dtype(dtype))
    given_fixes = None if fixes is None else tuple(parse_fixes(list(fixes)))
    if manifest is None:
        return PortSettings(given_dtype or "fp32", given_fixes or ())
    own_dtype = dtype_name(parse_dtype(manifest.dtype))
    own_fixes = tuple(parse_fixes(list(manifest.fixes)))
    chosen_dtype = given_dtype or own_dtype
    chosen_fixes = own_fixes if given_fixes is None else given_fixes
    own = f"{own_dtype} with {_fixes_text(own_fixes)}"
    if given_dtype is None and given_fixes is None:
        note = f"port: {own} from vitport.json ({override})"
    elif given_dtype is None:
        note = (
            f"port: {own_dtype} from vitport.json, {_fixes_text(chosen_fixes)} as given (its "
            f"own: {_fixes_text(own_fixes)}; {override})"
        )
    elif given_fixes is None:
        note = (
            f"port: {_fixes_text(own_fixes)} from vitport.json, {given_dtype} as given (its "
            f"own: {own_dtype}; {override})"
        )
    else:
        note = f"port: {given_dtype} with {_fixes_text(given_fixes)} as given (its own: {own})"
    from_port = given_dtype is None or given_fixes is None
    return PortSettings(chosen_dtype, chosen_fixes, note, from_port)


def _fixes_text(fixes: Sequence[str]) -> str:
    return ", ".join(fixes) if fixes else "no fixes"
