"""msprobe dumps: a second reader and writer beside golden.py, split by job: `read` (open and
check a dump), `bind` (its records bound to an Encoder's blocks and parts, and the reference
Features they give), `write` (a dump msprobe reads).

Read: a `task: tensor` dump at level L0 or mix (``dump.json``, ``construct.json``,
``dump_tensor_data/*.pt``) becomes the reference of compare: its first module's input gives the
pixel batches, its block and part records give the states localisation teacher-forces on, and
its final-norm output gives the reference tokens. Write: `dump` records every module call of an
Encoder's forward in msprobe's layout and field names, so that `msprobe compare` reads it.
"""

from __future__ import annotations

from vitport.msprobe.bind import DumpBlocks, bind, is_dump_reference, reference_features
from vitport.msprobe.read import (
    CONSTRUCT_JSON,
    DUMP_JSON,
    FORMAT,
    STACK_JSON,
    TENSOR_DIR,
    Call,
    Dump,
    find_dump_json,
    is_dump,
    open_dump,
    parse_key,
)
from vitport.msprobe.write import write_dump

__all__ = [
    "CONSTRUCT_JSON",
    "DUMP_JSON",
    "FORMAT",
    "STACK_JSON",
    "TENSOR_DIR",
    "Call",
    "Dump",
    "DumpBlocks",
    "bind",
    "find_dump_json",
    "is_dump",
    "is_dump_reference",
    "open_dump",
    "parse_key",
    "reference_features",
    "write_dump",
]
