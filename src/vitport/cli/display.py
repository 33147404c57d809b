"""What commands show while they work and when they are done: progress that honours --quiet,
and tables fitted to the terminal (--wide: all columns)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console

from vitport.cli.app import STATE, console, errors, esc


def show(table, drop_order: tuple[str, ...] = ()) -> None:
    """Print a table whole: columns fold rather than cut, and at a narrow terminal the least
    needed ones (drop_order) go first; --wide keeps them all."""
    from vitport.cli.fit import fit, natural_width

    if STATE["wide"]:  # the whole table, as wide as it needs, past the terminal's edge
        table = fit(table, None)
        Console(width=max(console.width, natural_width(table))).print(table)
    else:
        console.print(fit(table, console.width, drop_order))


class Activity:
    """A running display: update() sets its text, tick(done, total) moves its bar."""

    def __init__(self, set_fields: Callable[..., None], speed_from_first_tick: bool) -> None:
        self._set = set_fields
        self._start = None if speed_from_first_tick else time.perf_counter()

    def update(self, text: str) -> None:
        self._set(description=text)

    def tick(self, done: int, total: int, text: str | None = None) -> None:
        now = time.perf_counter()
        if self._start is None:
            self._start = now
        spent = now - self._start
        speed = f"{done / spent:.1f} img/s" if spent > 0 else ""
        fields = {} if text is None else {"description": text}
        self._set(completed=done, total=total, speed=speed, **fields)


@contextlib.contextmanager
def progress(
    text: str,
    *,
    bar: bool = False,
    elapsed: bool = False,
    eta: bool = False,
    stderr: bool = False,
    speed_from_first_tick: bool = False,
    quiet: bool = False,
) -> Iterator[Activity]:
    """The one transient display of every command: a spinner (default), with the time elapsed,
    or a bar with images/s and the time left; nothing with --quiet (or quiet)."""
    out = errors if stderr else console
    if quiet or STATE["quiet"]:
        yield Activity(lambda **_: None, speed_from_first_tick)
        return
    if not (bar or elapsed or eta):
        with out.status(text) as status:

            def set_text(description: str | None = None, **_: object) -> None:
                if description is not None:
                    status.update(description)

            yield Activity(set_text, speed_from_first_tick)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list = [TextColumn("{task.description}")]
    if bar:
        columns += [BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}")]
    else:
        columns.insert(0, SpinnerColumn())
    if elapsed:
        columns.append(TimeElapsedColumn())
    if eta:
        columns.append(TimeRemainingColumn())
    with Progress(*columns, console=out, transient=True) as display:
        task = display.add_task(text, total=None, speed="")
        yield Activity(lambda **f: display.update(task, **f), speed_from_first_tick)


def steps(activity: Activity) -> Callable[[str], None]:
    """A library progress callback that shows each message on the activity as 'message ...'."""
    return lambda message: activity.update(esc(message) + " ...")
