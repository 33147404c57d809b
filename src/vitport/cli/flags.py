"""The one table from the library's parameters to the CLI's flags.

Library errors name parameters as a Python caller writes them and list them in `params`
(see `vitport.errors.VitportError`); the CLI shows the same message with its flags, in the manner
of huggingface_hub's `CLI_ERROR_MAPPINGS`. Python's ``name=value`` reads as ``--name value``.
"""

from __future__ import annotations

import re

from vitport.errors import VitportError

FLAGS: dict[str, str] = {
    "check=False": "--no-check",
    "attention": "--attn",
    "compiled": "--compile",
    "fixes": "--fix",
    "include_weights=False": "--no-weights",
    "from_layout": "--from",
    "warmup_batches": "--warmup",
}
"""Parameters (or whole spellings) whose flag the usual rule (``batch_size`` ->
``--batch-size``) does not give."""


def flag(param: str) -> str:
    """The CLI's spelling of a parameter's spelling in a message: ``batch_size`` and
    ``batch_size=...`` (any value) -> ``--batch-size``; ``overwrite=True`` -> ``--overwrite`` (a
    switch); ``to=`` -> ``--to `` (its value follows in the text); ``attention='flash'`` ->
    ``--attn flash``."""
    if param in FLAGS:  # a spelling the table names whole: check=False -> --no-check
        return FLAGS[param]
    name, equals, value = param.partition("=")
    option = FLAGS.get(name) or "--" + name.replace("_", "-")
    if not equals or value in ("True", "..."):
        return option
    return f"{option} {value.strip(chr(39))}" if value else option + " "


def cli_message(error: BaseException) -> str:
    """The error's message as the CLI shows it: each parameter it names, named by its flag."""
    text = str(error)
    params = error.params if isinstance(error, VitportError) else ()
    for param in sorted(params, key=len, reverse=True):  # "batch_sizes" before "batch_size"
        end = r"(?![\w-])" if param[-1].isalnum() or param[-1] == "_" else ""
        pattern = rf"(?<![\w.=-]){re.escape(param)}{end}"
        text = re.sub(pattern, lambda _m, p=param: flag(p), text)
    return text
