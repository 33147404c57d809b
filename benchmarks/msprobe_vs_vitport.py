"""msprobe and vitport side by side on the same planted faults: demo:dinov2-small on the CPU.

The reference is one msprobe L0 tensor dump of the clean model in fp32 (what a user brings from
a GPU). For every planted fault, in fp32 and bf16:
- msprobe: dump the faulty candidate with PrecisionDebugger, run `msprobe compare`, and take the
  first module output beyond its fixed limits (cosine < 0.99 or max abs error > 0.001);
- vitport: `vitport compare --reference REF_DUMP --localize`, no candidate dump.
Both run as their users run them (subprocesses, start-up included). Forward passes are counted
with global module hooks: block calls / depth, a teacher-forced attention or MLP as half a block.

Writes its section of docs/benchmarks.md. Run: python benchmarks/msprobe_vs_vitport.py
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from docs_section import write_section

MARK = "<!-- msprobe_vs_vitport -->"
MODEL = "demo:dinov2-small"
IMAGES = 2
BLOCKS = (3, 9)
FAULTS = ("gelu-tanh", "mlp-scale", "norm-swap")
COSINE, MAX_ABS = 0.99, 0.001  # msprobe's fixed limits
HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
BIN = Path(sys.executable).parent

COUNTING = """
import atexit, json, sys
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
counts, depth = {"block": 0, "part": 0}, [0]
def pre(m, args):
    name = type(m).__name__
    if name == "Dinov2Layer":
        counts["block"] += 1
        depth[0] += 1
    elif depth[0] == 0 and name in ("Dinov2Attention", "Dinov2MLP"):
        counts["part"] += 1
def post(m, args, out):
    if type(m).__name__ == "Dinov2Layer":
        depth[0] -= 1
register_module_forward_pre_hook(pre)
register_module_forward_hook(post)
atexit.register(lambda: open(COUNTS, "w").write(json.dumps(counts)))
from vitport.cli import main
sys.argv = ["vitport", *ARGS]
main()
"""


def run(args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=3600)
    return time.perf_counter() - start, done


def checked(args: list[str]) -> float:
    seconds, done = run(args)
    if done.returncode != 0:
        raise SystemExit(
            f"{' '.join(args[:4])} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return seconds


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def dump(out: Path, dtype: str, fault: str = "") -> float:
    args = [
        sys.executable,
        str(HERE / "msprobe_dump.py"),
        "--model",
        MODEL,
        "--out",
        str(out),
        "--dtype",
        dtype,
        "--images",
        str(IMAGES),
        "--batch-size",
        str(IMAGES),
    ]
    return checked(args + (["--fault", fault] if fault else []))


def block_of(name: str) -> int | None:
    found = re.search(r"\.layer\.(\d+)\.", name + ".")
    return int(found.group(1)) if found else None


def msprobe_side(reference: Path, work: Path, dtype: str, fault: str) -> dict:
    candidate = work / "candidate"
    seconds = dump(candidate, dtype, fault)
    disk = size_mb(candidate)
    result = work / "compare"
    result.mkdir()
    seconds += checked(
        [
            str(BIN / "msprobe"),
            "compare",
            "--target_path",
            str(candidate / "step0"),
            "--golden_path",
            str(reference / "step0"),
            "--output_path",
            str(result),
        ]
    )
    rows = list(csv.DictReader(next(result.glob("*.csv")).open()))
    outputs = [
        r for r in rows if r["NPU Name"].startswith("Module.") and ".output." in r["NPU Name"]
    ]

    def flagged(r: dict) -> bool:
        try:
            return float(r["Cosine"]) < COSINE or float(r["MaxAbsErr"]) > MAX_ABS
        except ValueError:
            return False

    bad = [r for r in outputs if flagged(r)]
    shutil.rmtree(candidate)
    first = bad[0]["NPU Name"] if bad else None
    return {
        "seconds": seconds,
        "forwards": 1.0,
        "disk_mb": disk,
        "first": first,
        "flagged": len(bad),
        "rows": len(outputs),
    }


def vitport_side(reference: Path, work: Path, dtype: str, fault: str) -> dict:
    counts, result = work / "counts.json", work / "result.json"
    args = [
        "compare",
        "--model",
        MODEL,
        "--device",
        "cpu",
        "--dtype",
        dtype,
        "--reference",
        str(reference),
        "--localize",
        "--json",
        str(result),
    ]
    if fault:
        args += ["--inject-fault", fault]
    code = COUNTING.replace("COUNTS", repr(str(counts))).replace("ARGS", repr(args))
    seconds, done = run([sys.executable, "-c", code])
    if done.returncode not in (0, 1):
        raise SystemExit(f"vitport compare failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    data = json.loads(result.read_text())
    calls = json.loads(counts.read_text())
    loc = data["localization"]
    return {
        "seconds": seconds,
        "forwards": (calls["block"] + calls["part"] / 2) / 12,
        "culprit": loc["culprit"],
        "passed": data["passed"],
        "reason": loc["reason"],
    }


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="msprobe-bench-"))
    reference = work / "reference"
    ref_seconds = dump(reference, "fp32")
    ref_mb = size_mb(reference)
    cases = [(d, "") for d in ("fp32", "bf16")]
    cases += [(d, f"{f}@{b}") for d in ("fp32", "bf16") for f in FAULTS for b in BLOCKS]
    rows = []
    for dtype, fault in cases:
        case = work / f"{dtype}-{fault.replace('@', '-block') or 'clean'}"  # msprobe refuses '@'
        case.mkdir()
        m = msprobe_side(reference, case, dtype, fault)
        v = vitport_side(reference, case, dtype, fault)
        planted = int(fault.split("@")[1]) if fault else None
        rows.append((dtype, fault, planted, m, v))
        print(dtype, fault, m, v, flush=True)
    shutil.rmtree(work)

    def named(name: str | None, planted: int | None) -> str:
        if planted is None:
            return "(none planted)"
        return "yes" if name is not None and block_of(name) == planted else "no"

    def short(name: str | None) -> str:
        if name is None:
            return "nothing"
        return name.removeprefix("Module.").split(".forward.")[0] if "Module." in name else name

    table = [
        "| dtype | planted | msprobe: first row beyond its limits | named first | rows flagged | "
        "s | forwards | disk MB | vitport: culprit | named first | verdict | s | forwards | disk MB |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for dtype, fault, planted, m, v in rows:
        table.append(
            f"| {dtype} | {fault or 'none'} | `{short(m['first'])}` | {named(m['first'], planted)} "
            f"| {m['flagged']}/{m['rows']} | {m['seconds']:.1f} | {m['forwards']:.0f} | "
            f"{ref_mb + m['disk_mb']:.0f} | `{v['culprit'] or 'none'}` | "
            f"{named(v['culprit'], planted)} | {'PASS' if v['passed'] else 'FAIL'} | "
            f"{v['seconds']:.1f} | {v['forwards']:.1f} | {ref_mb:.0f} |"
        )
    m_hits = sum(named(m["first"], p) == "yes" for _, _, p, m, _ in rows if p is not None)
    v_hits = sum(named(v["culprit"], p) == "yes" for _, _, p, _, v in rows if p is not None)
    planted_cases = sum(
        p is not None for *_, p, _, _ in [(r[0], r[1], r[2], r[3], r[4]) for r in rows]
    )
    early = [
        f"{d} {f}: msprobe's first flagged row is `{short(m['first'])}`"
        for d, f, p, m, _ in rows
        if p is not None and m["first"] is not None and (block_of(m["first"]) or -1) < p
    ]
    late = [
        f"{d} {f}: msprobe's first flagged row is `{short(m['first'])}`"
        for d, f, p, m, _ in rows
        if p is not None and m["first"] is not None and (block_of(m["first"]) or -1) > p
    ]
    clean = [(d, m, v) for d, f, p, m, v in rows if p is None]
    lines = [
        f"## CPU: msprobe and vitport on the same planted faults ({datetime.date.today()})",
        "",
        f"Command: `python benchmarks/msprobe_vs_vitport.py`. torch {torch.__version__}, "
        f"{MODEL} (12 blocks), {IMAGES} images in one batch, 2 CPU cores. Reference: one msprobe "
        f"L0 tensor dump of the clean fp32 model ({ref_seconds:.1f} s, {ref_mb:.0f} MB), shared by "
        "both tools and counted in both disk columns. msprobe: a dump of the faulty candidate, "
        "`msprobe compare`, and the first module output with cosine < 0.99 or max abs error > "
        "0.001. vitport: `vitport compare --reference REF_DUMP --localize` (no candidate dump). "
        "Seconds are wall time with start-up; forwards are block calls / 12, a teacher-forced "
        "attention or MLP counted as half a block (vitport's count includes its fp32/fp64 floor "
        "runs and, for bf16, the rounded-weights floor).",
        "",
        *table,
        "",
        f"Planted block named first: msprobe {m_hits} of {planted_cases}, vitport {v_hits} of "
        f"{planted_cases}.",
        "",
    ]
    for dtype, m, v in clean:
        lines.append(
            f"- No fault, {dtype}: msprobe's limits flag {m['flagged']} of {m['rows']} module "
            f"outputs (first `{short(m['first'])}`); vitport says "
            f"{'PASS' if v['passed'] else 'FAIL'}, culprit `{v['culprit'] or 'none'}`."
        )
    if early:
        lines.append(
            "- msprobe's fixed limits flag a module before the planted block, where vitport's "
            "teacher-forced local error against its noise floor clears it: "
            + "; ".join(early)
            + "."
        )
    if late:
        lines.append(
            "- msprobe names a block after the planted one (the fault's error stays inside its "
            "limits until a later module amplifies it), where vitport's teacher forcing names "
            "the planted block: " + "; ".join(late) + "."
        )
    missed = [f"{d} {f}" for d, f, p, _, v in rows if p is not None and v["culprit"] is None]
    if missed:
        lines.append(
            "- vitport names no culprit (the planted error is within the noise of the dtype, "
            "and the verdict says whether it matters): " + ", ".join(missed) + "."
        )
    reverse = [
        f"{d} {f}"
        for d, f, p, m, v in rows
        if p is not None and named(v["culprit"], p) != "yes" and named(m["first"], p) == "yes"
    ]
    if reverse:
        lines.append(
            "- The reverse (msprobe names the planted block, vitport does not): "
            + ", ".join(reverse)
            + "."
        )
    print(write_section(MARK, lines))


if __name__ == "__main__":
    main()
