"""What vitport knows: `models`, `devices`, `fixes` and `thresholds`."""

from __future__ import annotations

from vitport.cli.app import console, esc
from vitport.cli.display import show
from vitport.cli.tables import device_table, fixes_table, sources_table, thresholds_table


def fixes() -> None:
    """List the precision fixes any command can apply with --fix."""
    from vitport.fixes import FIXES

    show(fixes_table(FIXES.values()))


def thresholds() -> None:
    """Show the default pass/fail limits of `vitport compare` per dtype, and why."""
    from vitport.compare.verdict import DEFAULT_THRESHOLDS, THRESHOLD_REASONS

    for dtype, limits in DEFAULT_THRESHOLDS.items():
        show(thresholds_table(dtype, limits))
        console.print(THRESHOLD_REASONS[dtype], soft_wrap=False)
    console.print("override any of them with --threshold METRIC=VALUE or GROUP.METRIC=VALUE")


def models() -> None:
    """List the model specs and families vitport understands."""
    from vitport.families import SOURCES, demo_names
    from vitport.families.base import supported_types

    show(sources_table(SOURCES))
    console.print(f"transformers model types: {supported_types()}")
    console.print("timm: Vision Transformers (timm.models.vision_transformer and kin)")
    console.print(f"demo models: {', '.join('demo:' + n for n in demo_names())}")


def devices() -> None:
    """Show the devices this machine offers and describe the default one."""
    from vitport.device import available_devices, npu_problem, resolve_device

    console.print(f"available: {', '.join(available_devices())}")
    problem = npu_problem()
    if problem:
        console.print(f"[yellow]npu:[/yellow] {esc(problem)}", soft_wrap=True)
    show(device_table(resolve_device("auto").describe()))
