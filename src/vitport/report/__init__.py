"""The whole proof of a port: run once (`build_report`), write many times (`write_report`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vitport.errors import VitportError
from vitport.report.build import (
    SCHEMA_VERSION,
    ReportOptions,
    ReportRun,
    RunLog,
    build_report,
    run_report,
)
from vitport.report.plots import write_plots
from vitport.report.render import render
from vitport.report.strings import LANGS, labels

__all__ = [
    "LANGS",
    "ReportOptions",
    "ReportRun",
    "RunLog",
    "build_report",
    "read_report",
    "run_report",
    "write_report",
]


def write_report(data: dict[str, Any], directory: Path, lang: str = "en") -> Path:
    """README.md, report.json, PNG plots, the raw JSON of each step and the log, in `directory`."""
    if lang not in LANGS:
        raise VitportError(
            f"lang={lang} is not available; choose one of {', '.join(LANGS)}", params=("lang=",)
        )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(data, indent=2, ensure_ascii=False))
    for step in ("inference", "bench", "compare"):
        (directory / f"{step}.json").write_text(json.dumps(data[step], indent=2))
    (directory / "report.log").write_text("\n".join(data.get("log", [])) + "\n")
    plots = write_plots(data, directory, labels("en"))  # matplotlib's fonts lack CJK glyphs
    readme = directory / "README.md"
    readme.write_text(render(data, lang, plots))
    return readme


def read_report(path: Path) -> dict[str, Any]:
    """A report.json written earlier, checked for its schema version."""
    if path.is_dir():
        path = path / "report.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise VitportError(f"{path} not found; write one with vitport report --out DIR") from exc
    except json.JSONDecodeError as exc:
        raise VitportError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    if data.get("schema_version") != SCHEMA_VERSION:
        raise VitportError(
            f"{path} has schema version {data.get('schema_version')}, this vitport reads "
            f"{SCHEMA_VERSION}; re-run vitport report"
        )
    return data
