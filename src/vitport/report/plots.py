"""The report's PNG plots, drawn from report.json's data alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FIGSIZE = (8.0, 4.5)
DPI = 100  # 800 x 450 pixels


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=FIGSIZE, dpi=DPI)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def performance(data: dict[str, Any], path: Path, labels: dict[str, str]) -> Path | None:
    rows = data["bench"]["rows"]
    if not rows:
        return None
    plt, fig = _figure()
    ax = fig.add_subplot(111)
    batches = [r["batch_size"] for r in rows]
    ax.plot(batches, [r["p50_ms"] for r in rows], "o-", color="tab:blue", label=labels["p50"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel(labels["batch"])
    ax.set_ylabel(labels["p50"], color="tab:blue")
    twin = ax.twinx()
    twin.plot(batches, [r["images_per_second"] for r in rows], "s--", color="tab:orange")
    twin.set_ylabel(labels["throughput"], color="tab:orange")
    ax.set_title(f"{data['model']['spec']} · {data['bench']['device']} {data['bench']['dtype']}")
    return _save(plt, fig, path)


def block_errors(data: dict[str, Any], path: Path, labels: dict[str, str]) -> Path | None:
    loc = data["compare"].get("localization")
    if not loc:
        return None
    points = [p for p in loc["points"] if p["kind"] in ("embeddings", "block", "final_norm")]
    names = [
        "emb"
        if p["kind"] == "embeddings"
        else str(p["block"])
        if p["block"] is not None
        else "norm"
        for p in points
    ]
    plt, fig = _figure()
    ax = fig.add_subplot(111)
    floor = 1e-12  # zero cannot be drawn on a log axis
    ax.plot(
        names, [max(p["accumulated"], floor) for p in points], "o-", label=labels["accumulated"]
    )
    ax.plot(names, [max(p["local"], floor) for p in points], "s--", label=labels["local"])
    ax.set_yscale("log")
    ax.set_xlabel(labels["block"])
    ax.set_ylabel(labels["rel_error"])
    ax.legend()
    ax.set_title(labels["block_errors_title"])
    return _save(plt, fig, path)


def patch_error(data: dict[str, Any], path: Path, labels: dict[str, str]) -> Path | None:
    grid = data["compare"].get("patch_error_map")
    if not grid:
        return None
    plt, fig = _figure()
    ax = fig.add_subplot(111)
    image = ax.imshow(grid, cmap="magma")
    fig.colorbar(image, ax=ax, label=labels["rel_error"])
    ax.set_title(f"{labels['patch_error_title']} · {data['compare']['inputs'][0]}")
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(plt, fig, path)


PLOTS = {
    "performance": ("performance.png", performance),
    "block_errors": ("block_errors.png", block_errors),
    "patch_error": ("patch_error.png", patch_error),
}


def write_plots(data: dict[str, Any], directory: Path, labels: dict[str, str]) -> dict[str, str]:
    """Draw every plot the data allows; returns {plot name: file name}."""
    drawn = {}
    for name, (filename, draw) in PLOTS.items():
        if draw(data, directory / filename, labels) is not None:
            drawn[name] = filename
    return drawn
