"""`vitport bench --optimize`: the search for the fastest faithful setup, and its output."""

from __future__ import annotations

from vitport.cli.app import console, esc
from vitport.cli.display import progress, show, steps
from vitport.cli.inputs import load_model, read_inputs
from vitport.errors import VitportError
from vitport.format import count


def bench_optimize(
    model,
    images,
    device,
    sizes,
    window,
    image_size,
    weights,
    trust_remote_code,
    cuda_shim,
    json_out,
    budget=None,
    runtimes=None,
) -> None:
    import json

    from vitport.bench.optimize import optimize as run_optimize
    from vitport.cli.bench_tables import optimize_table
    from vitport.device import resolve_device
    from vitport.runtimes import RUNNERS, Setup, runner

    names = RUNNERS.parse(runtimes) or None
    for name in names or []:
        missing = runner(name).missing()
        if missing:
            raise VitportError(missing)
    target = resolve_device(device)
    loaded, _ = read_inputs(images, image_size or 224)
    base = load_model(model, "cpu", Setup(), image_size, weights, trust_remote_code, cuda_shim)
    with progress("optimising ...") as activity:
        result = run_optimize(
            base,
            target,
            loaded,
            sizes,
            window,
            budget=budget,
            runtimes=names,
            progress=steps(activity),
        )
    show(optimize_table(result))
    console.print(f"[dim]{esc(result.plan)}[/dim]", highlight=False)
    for line in result.runtimes_skipped:
        console.print(f"[dim]runtime skipped: {esc(line)}[/dim]", highlight=False)
    if result.skipped:
        console.print(
            f"[yellow]budget reached:[/yellow] {count(len(result.skipped), 'configuration')} not tried "
            f"({', '.join(result.skipped)}); to include them, raise --budget or give --budget none",
            highlight=False,
        )
    best = result.best()
    if best is None:
        console.print("[red]no configuration was faithful[/red]")
    else:
        trial, batch = best
        speedup = result.speedup()
        console.print(
            f"[bold]fastest faithful:[/bold] {trial.label()} at batch {batch}: "
            f"{trial.speed(batch):.1f} img/s"
            + (
                f", {speedup:.2f}x the baseline (fp32, attention as loaded, no compile) timed "
                "beside it at the same batch"
                if speedup
                else ""
            )
        )
        if result.drift():
            console.print(f"[yellow]note:[/yellow] {esc(result.drift())}", soft_wrap=True)
    if json_out is not None:
        from vitport.outputs import write_text

        write_text(json_out, json.dumps(result.to_dict(), indent=2))
        console.print(f"written: [bold]{esc(json_out)}[/bold]")
