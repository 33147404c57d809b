"""report.json -> README.md, in English or Chinese, from one template.

The template is the code below; only the words differ between languages, and they live in
`vitport.report.strings`. Every number comes from the data, so re-rendering the same
report.json gives the same README.
"""

from __future__ import annotations

from typing import Any

from vitport.compare.run import CompareResult
from vitport.compare.verdict import unused_limits
from vitport.format import improvement, limit, metric_value, num, pct, pct_column, ratio, share
from vitport.report.strings import STRINGS


def table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def throughput(measurement: dict[str, Any]) -> float:
    from vitport.bench.timing import Measurement

    return Measurement.from_dict(measurement).images_per_second


def limits_text(result: CompareResult) -> str:
    unused = unused_limits(result.thresholds, result.groups)
    marks = []
    for t in result.thresholds:
        if t in unused:
            continue  # e.g. a logits limit for a model without logits
        sign = ">" if t.higher_is_better else "<"
        where = f"{t.group}." if t.group else ""
        marks.append(f"{where}{t.metric} {sign} {limit(t.metric, t.limit)}")
    return ", ".join(marks)


def floor_text(result: CompareResult, s: dict[str, str]) -> str:
    """What the floor is, in the report's language; the same words as `compare`'s legend."""
    if result.floor_dtype == "fp32":
        return s["floor_fp32"]
    return s["floor_rounded"].format(dtype=result.floor_dtype)


def trial_label(trial: dict[str, Any]) -> str:
    """A search trial's row label, by the precision it ran (see Trial.label)."""
    from vitport.bench.optimize import Trial

    return Trial.from_dict(trial).label()


def speed_line(data: dict[str, Any], s: dict[str, str]) -> str:
    """The port's speed-up over the reference dtype on the same device, and why, where the
    dtype runs emulated; "" where the report has none (same dtypes, or an older report)."""
    speed = data.get("speed")
    if not speed:
        return ""
    device, dtype = data["command"]["device"], data["command"]["dtype"]
    if speed.get("error"):
        return s["vs_reference_failed"].format(
            ref_dtype=speed["reference_dtype"], device=device, dtype=dtype, error=speed["error"]
        )
    why = ""
    if speed["emulated"]:
        why = s["emulated"].format(
            dtype=speed["dtype"], peak=speed["peak_tflops"], fp32=speed["fp32_peak_tflops"]
        )
    return s["vs_reference"].format(
        dtype=speed["dtype"],
        ratio=speed["ratio"],
        ref_dtype=speed["reference_dtype"],
        ips=speed["images_per_second"],
        ref_ips=speed["reference_images_per_second"],
        batch=speed["batch_size"],
        device=device,
        why=why,
    )


def headline(data: dict[str, Any], s: dict[str, str]) -> list[str]:
    """The first lines: faithful or not, the fastest configuration, the best fix."""
    cmd, cmp, perf = data["command"], data["compare"], data["bench"]
    result = CompareResult.from_dict(cmp)
    ref = f"{cmp['reference']['device']} {cmp['reference']['dtype']}"
    lines = []
    if cmp["passed"]:
        lines.append(
            s["faithful"].format(
                device=cmd["device"], dtype=cmd["dtype"], ref=ref, limits=limits_text(result)
            )
        )
    else:
        failures = "; ".join(
            f"{c.group}.{c.metric} = {metric_value(c.metric, c.value)} "
            f"(limit {limit(c.metric, c.limit)})"
            for c in result.verdict.failures
        )
        lines.append(
            s["unfaithful"].format(
                device=cmd["device"], dtype=cmd["dtype"], ref=ref, failures=failures
            )
        )
    rows = perf["rows"]
    if rows:
        best = max(rows, key=lambda r: r["images_per_second"])
        mfu = f", MFU {share(best['mfu'])}" if best["mfu"] is not None else ""
        key = "fastest" if cmp["passed"] else "fastest_unfaithful"
        lines.append(
            s[key].format(
                batch=best["batch_size"],
                ips=best["images_per_second"],
                ms=best["ms_per_image"],
                mfu=mfu,
            )
        )
    line = speed_line(data, s)
    if line:
        lines.append(line)
    search = data.get("optimize")
    if search and search.get("best"):
        best = search["best"]
        trial = next(t for t in search["trials"] if t["config"] == best["config"])
        speed = throughput(trial["measurements"][str(best["batch_size"])])
        speedup = search.get("speedup_over_baseline")
        lines.append(
            s["best_config"].format(
                label=trial_label(trial),
                batch=best["batch_size"],
                ips=speed,
                speedup=f"{speedup:.2f}x"
                if speedup
                else s["drifted"]
                if search.get("drift")
                else "n/a",
            )
        )
    best_fix = result.best_trial()
    if best_fix is not None:
        lines.append(
            s["cure"].format(
                fix=best_fix.fixes[0],
                before=pct(result.worst_rel_error),
                after=pct(best_fix.worst_rel_error),
            )
        )
    return lines


def render(data: dict[str, Any], lang: str = "en", plots: dict[str, str] | None = None) -> str:
    """The README of a port, in the seeds' sections."""
    s = STRINGS[lang]
    plots = plots or {}
    cmd, model, env = data["command"], data["model"], data["environment"]
    perf, cmp, inf = data["bench"], data["compare"], data["inference"]
    result = CompareResult.from_dict(cmp)
    h, w = model["image_size"]
    out = [f"# {s['title'].format(spec=model['spec'], device=cmd['device'])}", ""]
    out += [f"- {line}" for line in headline(data, s)] + [""]
    out += [s["generated"].format(version=data["vitport_version"], created=data["created"]), ""]

    out += [f"## {s['intro']}", ""]
    out += [
        s["intro_text"].format(
            spec=model["spec"],
            family=model["family"],
            params=f"{model['params'] / 1e6:.2f}M",
            depth=model["depth"],
            hidden=model["hidden_size"],
            h=h,
            w=w,
            layout=model["layout"]["description"],
        ),
        "",
    ]

    out += [f"## {s['env']}", ""]
    out += table([s["key"], s["value"]], [[k, str(v)] for k, v in env.items()], "ll")

    out += [f"## {s['weights']}", ""]
    out += [s["weights_text"].format(source=model["source"], sha=model["weights_sha256"]), ""]
    out += [s["fetch"], "", "```bash", model["fetch"], "```", ""]

    out += [f"## {s['deps']}", ""]
    versions = " ".join(
        f"{k}=={env[k].split('+')[0]}"
        for k in ("torch", "transformers", "timm")
        if env.get(k) and env[k] not in ("not installed", "unknown")
    )
    out += ["```bash", f"pip install vitport {versions}".strip(), "```", ""]

    out += [f"## {s['inference']}", ""]
    flags = " ".join(f"--fix {f}" for f in cmd["fixes"])
    out += [
        "```bash",
        f"vitport infer --model {model['spec']} --device {cmd['device']} "
        f"--dtype {cmd['dtype']} {flags}".strip(),
        "```",
        "",
    ]
    out += [s["inference_text"].format(image=inf["image"], first=inf["first_call_ms"]), ""]
    out += table(
        [s["output"], s["shape"]],
        [[k, " x ".join(map(str, v))] for k, v in inf["shapes"].items()],
        "ll",
    )
    values = ", ".join(f"{v:+.4f}" for v in inf["pooled_first"])
    out += [s["first_values"].format(values=values), ""]

    out += [f"## {s['perf']}", ""]
    peak = perf.get("peak")
    peak_text = (
        f"{peak['tflops']:.2f} TFLOP/s ({peak['size']}³ {peak['dtype']} matmul)" if peak else "n/a"
    )
    if perf.get("vendor_tflops"):
        peak_text += f"; vendor {perf['vendor_tflops']:g} TFLOP/s"
    out += [
        s["perf_text"].format(
            device=perf["device"],
            dtype=perf["dtype"],
            h=h,
            w=w,
            gflops=perf["flops"]["total"] / 1e9,
            peak=peak_text,
        )
    ]
    if perf["rows"]:
        first = perf["rows"][0]
        out[-1] += " " + s["first_call_note"].format(
            load=model["load_seconds"], first=first["first_call_ms"], median=first["p50_ms"]
        )
    out += [""]
    rows = [
        [
            str(r["batch_size"]),
            f"{r['p50_ms']:.2f}",
            f"{r['p90_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['mean_ms']:.2f} ± {r['std_ms']:.2f}",
            f"{r['ms_per_image']:.2f}",
            f"{r['images_per_second']:.1f}",
            f"{r['achieved_tflops']:.3f}",
            share(r["mfu"]),
            share(r["vendor_mfu"]),
        ]
        for r in perf["rows"]
    ]
    out += table(
        [
            s["batch"],
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "mean ± std ms",
            "ms/img",
            "img/s",
            "TFLOP/s",
            "MFU",
            s["mfu_vendor"],
        ],
        rows,
    )
    if "performance" in plots:
        out += [f"![{s['perf']}]({plots['performance']})", ""]
    search = data.get("optimize")
    if search:
        out += [f"### {s['search']}", "", s["search_text"], ""]
        sizes = search["batch_sizes"]
        rows = []
        errors = pct_column([trial["worst_rel_error"] for trial in search["trials"]])
        for trial, error in zip(search["trials"], errors, strict=True):
            speeds = []
            for b in sizes:
                m = trial["measurements"].get(str(b))
                speeds.append(f"{throughput(m):.1f}" if m else "-")
            ok = {True: s["yes"], False: s["no"], None: s["could_not_run"]}[trial["faithful"]]
            err = error if trial["worst_rel_error"] is not None else "-"
            runtime = trial["config"].get("runtime", "torch")
            if trial["config"]["compiled"]:
                runtime = "torch.compile"
            rows.append([runtime, trial_label(trial), ok, err, *speeds])
        out += table(
            [
                s["runtime_col"],
                s["configuration"],
                s["faithful_col"],
                s["rel_worst"],
                *[f"img/s bs{b}" for b in sizes],
            ],
            rows,
            "lllr" + "r" * len(sizes),
        )
        for line in search.get("runtimes_skipped", []):
            out += [f"- {s['runtime_skipped']}: {line}"]
        if search.get("runtimes_skipped"):
            out += [""]
        for line in (search.get("plan"), search.get("drift")):
            out += [line, ""] if line else []

    out += [f"## {s['accuracy']}", ""]
    ref = cmp["reference"]
    where = {"golden": "golden", "msprobe": s["msprobe_dump"]}.get(ref["kind"])
    ref_text = f"{ref['device']} {ref['dtype']}" + (f" ({where} {ref['path']})" if where else "")
    inputs = ", ".join(cmp["inputs"][:3]) + (", …" if len(cmp["inputs"]) > 3 else "")
    out += [
        s["accuracy_text"].format(
            device=cmd["device"],
            dtype=cmd["dtype"],
            ref=ref_text,
            n=len(cmp["inputs"]),
            inputs=inputs,
            floor=floor_text(result, s),
        ),
        "",
    ]
    groups = result.groups
    columns = [
        list(groups),
        pct_column([g.mean["rel_error"] for g in groups.values()]),
        pct_column([g.worst["rel_error"] for g in groups.values()]),
        [f"{g.worst['cos_worst']:.6f}" for g in groups.values()],
        [num(g.worst["max_abs"]) for g in groups.values()],
        pct_column(
            [result.floor[n].mean["rel_error"] if n in result.floor else None for n in groups]
        ),
        [ratio(result.floor_ratio.get(n, {}).get("rel_error")) for n in groups],
    ]
    rows = [list(row) for row in zip(*columns, strict=True)]
    out += table(
        [
            s["group"],
            s["rel_mean"],
            s["rel_worst"],
            s["cos_worst"],
            s["max_abs"],
            s["floor"],
            s["x_floor"],
        ],
        rows,
    )
    verdict = s["pass"] if cmp["passed"] else s["fail"]
    out += [
        f"**{s['verdict']}: {verdict}**. "
        + s["thresholds"].format(dtype=cmd["dtype"], limits=limits_text(result)),
        "",
    ]
    if "patch_error" in plots:
        out += [f"![{s['patch_error_title']}]({plots['patch_error']})", ""]

    out += [f"## {s['fixes']}", "", s["fixes_text"], ""]
    groups = list(result.groups)
    ran = [result.groups, *[t.groups for t in result.trials if t.groups]]
    errors = [pct_column([run[g].worst["rel_error"] for run in ran]) for g in groups]
    rows = [
        [
            s["none"],
            *[column[0] for column in errors],
            "",
            s["pass"] if result.passed else s["fail"],
        ]
    ]
    i = 0  # the run among those that ran
    for trial in result.trials:
        label = " + ".join(trial.fixes)
        if not trial.groups:
            rows.append([label, *["-"] * len(groups), "-", s["not_applicable"]])
            continue
        i += 1
        better = improvement(result.worst_rel_error, trial.worst_rel_error)
        rows.append(
            [
                label,
                *[column[i] for column in errors],
                better,
                s["pass"] if trial.verdict else s["fail"],
            ]
        )
    out += table(
        [s["fix"], *groups, s["better"], s["verdict"]], rows, "l" + "r" * (len(groups) + 1) + "l"
    )

    loc = cmp.get("localization")
    if loc:
        out += [f"## {s['blocks']}", "", s["blocks_text"], ""]
        points = result.localization.blocks()
        rows = [
            list(row)
            for row in zip(
                [
                    (
                        "embeddings"
                        if p.kind == "embeddings"
                        else f"block {p.block}"
                        if p.block is not None
                        else p.name
                    )
                    for p in points
                ],
                pct_column([p.accumulated for p in points]),
                pct_column([p.local for p in points]),
                strict=True,
            )
        ]
        out += table([s["block"], s["accumulated"], s["local"]], rows)
        if loc["culprit"]:
            out += [s["culprit"].format(name=loc["culprit"], reason=loc["reason"]), ""]
        else:
            out += [s["no_culprit"].format(reason=loc["reason"]), ""]
        if "block_errors" in plots:
            out += [f"![{s['blocks']}]({plots['block_errors']})", ""]

    out += [f"## {s['notes']}", ""]
    notes = list(model["notes"]) + list(perf["notes"]) + list(cmp["notes"])
    out += [f"{i}. {note}" for i, note in enumerate(notes, 1)] or [s["no_notes"]]
    return "\n".join(out).rstrip() + "\n"
