"""Errors a user can act on. Each message is one line: what is wrong, and what to do."""

from __future__ import annotations

import re

TRACEBACK_FRAME = re.compile(r'^File "')


class VitportError(Exception):
    """Base of every error the CLI turns into one line and an exit code.

    A message names the library's parameters as a Python caller writes them (``batch_size``,
    ``overwrite=True``); `params` lists those spellings, so that the CLI can name its own flags
    instead (``--batch-size``, ``--overwrite``) from its one table, `vitport.cli.flags.FLAGS`.
    """

    exit_code = 2

    def __init__(self, *args: object, params: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.params = params


class SpecError(VitportError):
    """The model spec names nothing vitport can load."""


class UnsupportedModelError(VitportError):
    """The checkpoint is of a model type vitport has no adapter for."""


class HubUnreachableError(VitportError):
    """A hub (Hugging Face, ModelScope) could not be reached."""


class PublishError(VitportError):
    """A hub could not be reached, or refused an upload: nothing more was published."""

    exit_code = 1


class WeightsError(VitportError):
    """Weights are missing, unsafe, or do not fit the architecture."""


class ImageError(VitportError):
    """No usable image was given."""


class UnreadableImageError(ImageError):
    """One image that cannot be used. `reason` says why in one line; `category` is the kind of
    problem, set where it is found (one of vitport.inputs.PROBLEM_CATEGORIES): serve answers
    with it as the error code, and tables of skipped inputs count by it."""

    def __init__(self, name: str, reason: str, category: str) -> None:
        super().__init__(f"{name}: {reason}" if name else reason)
        self.name, self.reason, self.category = name, reason, category


class DeviceError(VitportError):
    """The requested device or dtype cannot be used here."""


class OutOfMemoryError(VitportError):
    """The device ran out of memory."""


class GoldenMismatchError(VitportError):
    """A golden Features file does not match the run it is compared with."""


class ClusterError(VitportError):
    """The cluster lost what the run needed, or made no progress: what was written stays."""

    exit_code = 1


def one_line(error: BaseException | str, *, typed: bool = False, limit: int = 200) -> str:
    """An exception, or a tool's output, as one line to put inside a message.

    An exception gives the first non-empty line of its message; where the message holds a
    Python traceback (a Ray task's error, a server's failed deployment), the traceback's last
    line, which names the error. Without a message it gives its type name; with `typed`, the
    line follows its type name ("ValueError: bad size"). A tool's output (a str, such as pip's
    stderr) gives its last non-empty line, where tools say what failed. Whitespace runs become
    one space, and a line over `limit` characters is cut, ending in "…".
    """
    text = error if isinstance(error, str) else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(error, str):
        line = lines[-1] if lines else "no output"
    else:
        traceback = any(TRACEBACK_FRAME.match(line) for line in lines)
        line = (lines[-1] if traceback else lines[0]) if lines else ""
        name = type(error).__name__
        line = (f"{name}: {line}" if line else name) if typed else (line or name)
    line = " ".join(line.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
