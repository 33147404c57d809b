"""Rich tables for the CLI: results in, renderables out. No computation happens here."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from vitport.compare.run import CompareResult, describe_side
from vitport.format import gib, improvement, num, pct, ratio, share

GROUP_LABELS = {
    "cls": "CLS",
    "registers": "registers",
    "patches": "patches",
    "pooled": "pooled",
    "logits": "logits",
}


def accuracy_table(result: CompareResult) -> Table:
    """Per output group: the seeds' metrics (mean and worst input) and the noise floor."""
    table = Table(
        title=(
            f"{escape(result.spec)}: {escape(describe_side(result.candidate))} vs "
            f"{escape(describe_side(result.reference))}"
            f", {len(result.inputs)} inputs"
        )
    )
    for column in (
        "output", "rel err mean", "rel err worst", "vec rel", "max abs", "mse",
        "cos mean", "cos worst token", "floor rel err", "x floor",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column == "output" else "right")
    for name, group in result.groups.items():
        floor = result.floor.get(name)
        table.add_row(
            GROUP_LABELS.get(name, name),
            pct(group.mean["rel_error"]),
            pct(group.worst["rel_error"]),
            num(group.worst["vec_rel_error"]),
            num(group.worst["max_abs"]),
            num(group.mean["mse"]),
            f"{group.mean['cos_mean']:.6f}",
            f"{group.worst['cos_worst']:.6f}",
            pct(floor.mean["rel_error"]) if floor else "n/a",
            ratio(result.floor_ratio.get(name, {}).get("rel_error", float("nan"))),
        )
    return table


def per_input_table(result: CompareResult) -> Table:
    """Relative error and worst-token cosine of each input, per output group."""
    table = Table(title="per input: relative error (cos worst token)")
    table.add_column("input")
    for name in result.groups:
        table.add_column(GROUP_LABELS.get(name, name), justify="right")
    for i, image in enumerate(result.inputs):
        cells = []
        for group in result.groups.values():
            metrics = group.per_input[i]
            cells.append(f"{pct(metrics['rel_error'])} ({metrics['cos_worst']:.5f})")
        table.add_row(escape(image), *cells)
    return table


def task_lines(result: CompareResult) -> list[str]:
    """Task-level agreement: top-k of logits, nearest neighbours of pooled features."""
    lines = []
    logits = result.groups.get("logits")
    if logits is not None:
        lines.append(
            f"logits: top-1 agreement {pct(logits.batch.get('top1', float('nan')))}, "
            f"top-5 overlap {pct(logits.batch.get('top5', float('nan')))}"
        )
    pooled = result.groups.get("pooled")
    if pooled is not None and "knn_top1" in pooled.batch:
        spearman = pooled.batch.get("knn_spearman", float("nan"))
        lines.append(
            f"pooled: nearest neighbour agrees for {pct(pooled.batch['knn_top1'])} of inputs, "
            f"mean Spearman of neighbour ranks {num(spearman)}"
        )
    return lines


def verdict_text(result: CompareResult) -> Text:
    if result.passed:
        checks = ", ".join(sorted({f"{c.metric} {'>' if c.higher_is_better else '<'} {c.limit:g}"
                                   for c in result.verdict.checks}))  # fmt: skip
        return Text.assemble(("PASS", "bold green"), f"  faithful at {checks}")
    text = Text.assemble(("FAIL", "bold red"), "  ")
    for check in result.verdict.failures:
        sign = ">" if check.higher_is_better else "<"
        text.append(
            f"{check.group}.{check.metric} = {check.value:.4g} (needs {sign} {check.limit:g}); "
        )
    return text


def localization_table(result: CompareResult) -> Table:
    loc = result.localization
    table = Table(
        title=f"error by block; local = teacher-forced against {result.localization_reference}"
    )
    kinds = []
    for point in loc.points:
        if point.kind not in ("embeddings", "block", "final_norm") and point.kind not in kinds:
            kinds.append(point.kind)
    table.add_column("point")
    table.add_column("accumulated", justify="right")
    table.add_column("local", justify="right")
    for kind in kinds:
        table.add_column(f"local {kind}", justify="right")
    parts: dict[int, dict[str, float]] = {}
    for point in loc.points:
        if point.block is not None and point.kind in kinds:
            parts.setdefault(point.block, {})[point.kind] = point.local
    for point in loc.blocks():
        label = point.name if point.block is None else f"block {point.block}"
        hit = loc.culprit and (
            loc.culprit == point.name or loc.culprit.startswith(point.name + ".")
        )
        style = "bold red" if hit else None
        cells = [num(parts.get(point.block, {}).get(k, float("nan"))) for k in kinds]
        if point.block is None:
            cells = [""] * len(kinds)
        table.add_row(label, num(point.accumulated), num(point.local), *cells, style=style)
    return table


def trials_table(result: CompareResult) -> Table:
    """Before/after each precision fix, as in seed 000's table."""
    groups = list(result.groups)
    table = Table(title="precision fixes: relative error (worst input) before and after")
    table.add_column("fix")
    for name in groups:
        table.add_column(GROUP_LABELS.get(name, name), justify="right")
    table.add_column("max", justify="right")
    table.add_column("better by", justify="right")
    table.add_column("verdict")
    before = result.worst_rel_error
    table.add_row(
        "none (as ported)",
        *[pct(result.groups[g].worst["rel_error"]) for g in groups],
        pct(before),
        "",
        "PASS" if result.passed else "FAIL",
    )
    for trial in result.trials:
        label = " + ".join(trial.fixes)
        if trial.groups is None:
            table.add_row(label, *["-"] * len(groups), "-", "-", Text(trial.detail, style="dim"))
            continue
        after = trial.worst_rel_error
        table.add_row(
            label,
            *[pct(trial.groups[g].worst["rel_error"]) for g in groups],
            pct(after),
            improvement(before, after),
            "PASS" if trial.verdict else "FAIL",
        )
    return table


def bench_table(result) -> Table:
    """The seeds' performance table: per batch size latency percentiles, img/s, roofline."""
    table = Table(
        title=(
            f"{escape(result.spec)} on {result.device} ({result.dtype}, attention {result.attention}"
            f"{', compiled' if result.compiled else ''}), "
            f"{result.image_size[0]}x{result.image_size[1]}"
        )
    )
    for column in ("batch", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "mean ± std ms", "ms/img",
                   "img/s", "TFLOP/s", "MFU", "MFU vendor", "peak mem", "samples"):  # fmt: skip
        table.add_column(column, justify="right")
    best = result.best()
    for row in result.rows():
        style = "bold" if best is not None and row["batch_size"] == best.batch_size else None
        table.add_row(
            str(row["batch_size"]),
            f"{row['p50_ms']:.2f}",
            f"{row['p90_ms']:.2f}",
            f"{row['p95_ms']:.2f}",
            f"{row['p99_ms']:.2f}",
            f"{row['mean_ms']:.2f} ± {row['std_ms']:.2f}",
            f"{row['ms_per_image']:.2f}",
            f"{row['images_per_second']:.1f}",
            f"{row['achieved_tflops']:.3f}",
            share(row["mfu"]),
            share(row["vendor_mfu"]),
            gib(row["peak_memory_bytes"]),
            str(row["samples"]),
            style=style,
        )
    return table


def optimize_table(result) -> Table:
    table = Table(title="configurations tried (faithful = passes compare against CPU fp32)")
    table.add_column("configuration")
    table.add_column("faithful")
    table.add_column("worst rel err", justify="right")
    for batch in result.batch_sizes:
        table.add_column(f"img/s bs{batch}", justify="right")
    best = result.best()
    for trial in result.trials:
        faithful = {True: "yes", False: "no", None: "error"}[trial.faithful]
        if trial.faithful is False and trial.failed_checks:
            faithful += f" ({trial.failed_checks[0]})"
        if trial.error:
            faithful = f"error: {trial.error[:60]}"
        speeds = [
            f"{trial.speed(b):.1f}" if trial.speed(b) is not None else "-"
            for b in result.batch_sizes
        ]
        style = "bold green" if best is not None and trial is best[0] else None
        table.add_row(
            trial.config.label(),
            faithful,
            pct(trial.worst_rel_error) if trial.worst_rel_error is not None else "-",
            *speeds,
            style=style,
        )
    return table


def conversion_table(result) -> Table:
    """The proof of a conversion: per check and output group, the error against the source."""
    title = f"against the source: {len(result.inputs)} inputs at {result.image_size}px, fp32 limits"
    table = Table(title=title)
    for column in ("check", "output", "rel err worst", "max abs", "cos worst", "verdict"):
        table.add_column(column, justify="left" if column in ("check", "output") else "right")
    for check in result.checks:
        failed = {c.group for c in check.judgement.verdict.failures}
        for name, group in check.judgement.groups.items():
            table.add_row(
                check.label,
                GROUP_LABELS.get(name, name),
                pct(group.worst["rel_error"]),
                num(group.worst["max_abs"]),
                f"{group.worst['cos_worst']:.7f}",
                "[red]FAIL[/red]" if name in failed else "[green]pass[/green]",
            )
        for name in check.skipped:
            table.add_row(check.label, GROUP_LABELS.get(name, name), "-", "-", "-", "not compared")
    return table


def _needed(column) -> int:
    """The narrowest a column can be without cutting a cell: its longest header word, its
    longest cell (numbers do not wrap)."""
    words = str(column.header).split() or [""]
    return max([*map(len, words), *map(_length, column.cells)])


def _natural(column) -> int:
    return max(len(str(column.header)), *map(_length, column.cells))


def natural_width(table: Table) -> int:
    """The width at which no header or cell of `table` wraps."""
    return sum(_natural(c) + 3 for c in table.columns) + 1


def _length(cell) -> int:
    return len(Text.from_markup(cell).plain) if isinstance(cell, str) else len(str(cell))


def fit(table: Table, width: int | None, drop_order: tuple[str, ...] = ()) -> Table:
    """The table with every cell whole: at `width` (None: any width) the columns of
    `drop_order` are dropped, first first, until the rest fits with headers wrapped; cells are
    never cut to '…'. The caption says what was dropped; --wide shows everything."""
    columns = list(table.columns)

    def total(cols, size) -> int:
        return sum(size(c) + 3 for c in cols) + 1

    dropped = []
    for name in drop_order:
        if width is None or total(columns, _needed) <= width:
            break
        keep = [c for c in columns if str(c.header) != name]
        if len(keep) < len(columns):
            columns, dropped = keep, [*dropped, name]
    squeeze = width is not None and total(columns, _natural) > width
    fitted = Table(title=table.title)
    if dropped:
        fitted.caption = (
            f"not shown at this width: {', '.join(dropped)} (vitport --wide shows them)"
        )
    for column in columns:
        fitted.add_column(column.header, justify=column.justify, overflow="fold",
                          width=_needed(column) if squeeze else None)  # fmt: skip
    cells = [list(c.cells) for c in columns]
    for index, row in enumerate(table.rows):
        fitted.add_row(*(c[index] for c in cells), style=row.style)
    return fitted
