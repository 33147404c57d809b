"""The `vitport` command: thin wiring of the library to typer and rich.

app.py holds the app, its shared options and error handling; each command lives in its own
module and is registered here, in the order `vitport --help` lists them.
"""

from __future__ import annotations

from vitport.cli import bench, compare, convert, embed, infer, info, publish, report, serve
from vitport.cli.app import Command, app, main, reflow_help

for command in (
    infer.infer,
    compare.compare,
    info.fixes,
    bench.bench,
    report.report,
    publish.publish,
    info.thresholds,
    info.models,
    info.devices,
    convert.convert,
    embed.embed,
    embed.dedup,
    serve.serve,
):
    app.command(cls=Command)(command)
reflow_help()

__all__ = ["app", "main"]
