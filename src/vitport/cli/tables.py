"""Rich tables for the CLI: results in, renderables out. No computation happens here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from vitport.format import count, improvement, limit, metric_value, num, pct, pct_column, ratio

if TYPE_CHECKING:  # compare.run imports torch, which `vitport --version` must not wait for
    from vitport.compare.run import CompareResult

GROUP_LABELS = {
    "cls": "CLS",
    "registers": "registers",
    "patches": "patches",
    "pooled": "pooled",
    "logits": "logits",
}


ACCURACY_COLUMNS = (
    "output",
    "rel err mean (%)",
    "rel err worst (%)",
    "vec rel worst (%)",
    "max abs",
    "mse",
    "cos mean",
    "cos worst token",
    "floor rel err (%)",
    "x floor",
)


def accuracy_table(result: CompareResult) -> Table:
    """Per output group: the seeds' metrics (mean and worst input) and the noise floor."""
    from vitport.compare.sides import describe_side

    table = Table(
        title=(
            f"{escape(result.spec)}: {escape(describe_side(result.candidate))} vs "
            f"{escape(describe_side(result.reference))}"
            f", {count(len(result.inputs), 'input')}"
        )
    )
    for column in ACCURACY_COLUMNS:
        table.add_column(column, justify="left" if column == "output" else "right")
    groups = result.groups
    floors = [
        result.floor[name].mean["rel_error"] if name in result.floor else None for name in groups
    ]
    columns = [
        [GROUP_LABELS.get(name, name) for name in groups],
        pct_column([g.mean["rel_error"] for g in groups.values()]),
        pct_column([g.worst["rel_error"] for g in groups.values()]),
        pct_column([g.worst["vec_rel_error"] for g in groups.values()]),
        [num(g.worst["max_abs"]) for g in groups.values()],
        [num(g.mean["mse"]) for g in groups.values()],
        [f"{g.mean['cos_mean']:.6f}" for g in groups.values()],
        [f"{g.worst['cos_worst']:.6f}" for g in groups.values()],
        pct_column(floors),
        [ratio(result.floor_ratio.get(name, {}).get("rel_error", float("nan"))) for name in groups],
    ]
    for row in zip(*columns, strict=True):
        table.add_row(*row)
    return table


def per_input_table(result: CompareResult) -> Table:
    """Relative error and worst-token cosine of each input, per output group."""
    table = Table(title="per input: relative error in % (cosine of the worst token)")
    table.add_column("input")
    columns = []
    for name, group in result.groups.items():
        table.add_column(GROUP_LABELS.get(name, name), justify="right")
        errors = pct_column([m["rel_error"] for m in group.per_input])
        columns.append(
            [f"{e} ({m['cos_worst']:.5f})" for e, m in zip(errors, group.per_input, strict=True)]
        )
    for i, image in enumerate(result.inputs):
        table.add_row(escape(image), *[column[i] for column in columns])
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
    """PASS with the limits met, or FAIL with each failing value and its limit, in their units."""
    if result.passed:
        checks = ", ".join(
            sorted(
                {
                    f"{c.metric} {'>' if c.higher_is_better else '<'} {limit(c.metric, c.limit)}"
                    for c in result.verdict.checks
                }
            )
        )
        return Text.assemble(("PASS", "bold green"), f"  faithful at {checks}")
    text = Text.assemble(("FAIL", "bold red"), "  ")
    for check in result.verdict.failures:
        sign = ">" if check.higher_is_better else "<"
        text.append(
            f"{check.group}.{check.metric} = {metric_value(check.metric, check.value)} "
            f"(needs {sign} {limit(check.metric, check.limit)}); "
        )
    return text


def localization_table(result: CompareResult) -> Table:
    """Relative error (%) at the embeddings, each block and its parts: accumulated and local."""
    loc = result.localization
    table = Table(
        title=f"error by block; local = teacher-forced against {result.localization_reference}"
    )
    kinds = []
    for point in loc.points:
        if point.kind not in ("embeddings", "block", "final_norm") and point.kind not in kinds:
            kinds.append(point.kind)
    table.add_column("point")
    table.add_column("accumulated (%)", justify="right")
    table.add_column("local (%)", justify="right")
    for kind in kinds:
        table.add_column(f"local {kind} (%)", justify="right")
    parts: dict[int, dict[str, float]] = {}
    for point in loc.points:
        if point.block is not None and point.kind in kinds:
            parts.setdefault(point.block, {})[point.kind] = point.local
    rows = loc.blocks()
    columns = [
        pct_column([p.accumulated for p in rows]),
        pct_column([p.local for p in rows]),
        *[
            pct_column([parts.get(p.block, {}).get(k) for p in rows if p.block is not None])
            for k in kinds
        ],
    ]
    in_block = 0
    for i, point in enumerate(rows):
        label = point.name if point.block is None else f"block {point.block}"
        hit = loc.culprit and (
            loc.culprit == point.name or loc.culprit.startswith(point.name + ".")
        )
        cells = [""] * len(kinds)
        if point.block is not None:
            cells = [column[in_block] for column in columns[2:]]
            in_block += 1
        table.add_row(
            label, columns[0][i], columns[1][i], *cells, style="bold red" if hit else None
        )
    return table


def trials_table(result: CompareResult) -> Table:
    """Before/after each precision fix, as in seed 000's table."""
    groups = list(result.groups)
    table = Table(title="precision fixes: relative error in % (worst input) before and after")
    table.add_column("fix")
    for name in groups:
        table.add_column(GROUP_LABELS.get(name, name), justify="right")
    table.add_column("max", justify="right")
    table.add_column("better by", justify="right")
    table.add_column("verdict")
    runs = [(result.groups, result.worst_rel_error)]
    runs += [(t.groups, t.worst_rel_error) for t in result.trials if t.groups is not None]
    columns = [pct_column([run[g].worst["rel_error"] for run, _ in runs]) for g in groups]
    worst = pct_column([w for _, w in runs])
    before = result.worst_rel_error
    table.add_row(
        "none (as ported)",
        *[c[0] for c in columns],
        worst[0],
        "",
        "PASS" if result.passed else "FAIL",
    )
    i = 0  # the row of runs, among those that ran
    for trial in result.trials:
        label = " + ".join(trial.fixes)
        if trial.groups is None:
            table.add_row(label, *["-"] * len(groups), "-", "-", Text(trial.detail, style="dim"))
            continue
        i += 1
        table.add_row(
            label,
            *[c[i] for c in columns],
            worst[i],
            improvement(before, trial.worst_rel_error),
            "PASS" if trial.verdict else "FAIL",
        )
    return table


def conversion_table(result) -> Table:
    """The proof of a conversion: per check and output group, the error against the source."""
    title = f"against the source: {count(len(result.inputs), 'input')} at {result.image_size}px, fp32 limits"
    table = Table(title=title)
    for column in ("check", "output", "rel err worst (%)", "max abs", "cos worst", "verdict"):
        table.add_column(column, justify="left" if column in ("check", "output") else "right")
    rows = []
    for check in result.checks:
        failed = {c.group for c in check.judgement.verdict.failures}
        for name, group in check.judgement.groups.items():
            rows.append(
                (
                    check.label,
                    GROUP_LABELS.get(name, name),
                    group.worst["rel_error"],
                    num(group.worst["max_abs"]),
                    f"{group.worst['cos_worst']:.7f}",
                    "[red]FAIL[/red]" if name in failed else "[green]pass[/green]",
                )
            )
        for name in check.skipped:
            rows.append((check.label, GROUP_LABELS.get(name, name), None, "-", "-", "not compared"))
    errors = pct_column([r[2] for r in rows if r[2] is not None])
    for label, output, error, *rest in rows:
        table.add_row(label, output, "-" if error is None else errors.pop(0), *rest)
    return table


def fixes_table(fixes) -> Table:
    table = Table(title="precision fixes")
    table.add_column("name")
    table.add_column("what it does")
    for fix in fixes:
        table.add_row(fix.name, escape(fix.help))
    return table


def thresholds_table(dtype: str, limits) -> Table:
    table = Table(title=f"{dtype} defaults")
    table.add_column("group")
    table.add_column("metric")
    table.add_column("limit", justify="right")
    for t in limits:
        sign = ">" if t.higher_is_better else "<"
        table.add_row(t.group or "every group", t.metric, f"{sign} {limit(t.metric, t.limit)}")
    return table


def sources_table(sources) -> Table:
    table = Table(title="model specs")
    table.add_column("spec", no_wrap=True)  # a spec is copied whole, never broken
    table.add_column("meaning")
    for source in sources:
        table.add_row(escape(source.example), escape(source.help))
    return table


def device_table(description: dict[str, object]) -> Table:
    table = Table(title="auto device")
    table.add_column("field")
    table.add_column("value")
    for key, value in description.items():
        table.add_row(key, escape(str(value)))
    return table


def pairs_table(pairs, top: int) -> Table:
    """dedup: the `top` most similar pairs."""
    table = Table(title=f"most similar ({pairs.method})")
    if len(pairs) > top:
        table.caption = f"the {top} most similar shown (--show N for more)"
    for name in ("id a", "id b", "cosine"):
        table.add_column(name, justify="right" if name == "cosine" else "left")
    for a, b, sim in pairs.top(top):
        table.add_row(escape(str(a)), escape(str(b)), f"{sim:.4f}")
    return table
