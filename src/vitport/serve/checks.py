"""Everything `serve` can refuse before the model loads or a socket opens, one line each."""

from __future__ import annotations

import socket
from pathlib import Path

from vitport.errors import VitportError
from vitport.serve.config import ServeConfig

ENGINES = ("local", "ray")


def check_options(config: ServeConfig, engine: str) -> None:
    """Refuse a configuration that cannot serve, before the model loads."""
    from vitport.compare.check import open_source
    from vitport.compare.verdict import parse_threshold_overrides
    from vitport.device import resolve_device
    from vitport.faults import parse_fault
    from vitport.fixes import parse_fixes
    from vitport.runtimes import runner

    if engine not in ENGINES:
        raise VitportError(f"engine={engine!r} is not one; use local or ray", params=("engine=",))
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise VitportError(f"vitport serve needs {exc.name}: pip install 'vitport[serve]'") from exc
    parse_fixes(list(config.fixes))
    setup = config.setup  # names the dtype and the runtime, or refuses them
    kind = runner(setup.runtime)
    missing = kind.missing()
    if missing:
        raise VitportError(missing)
    if config.max_batch_size:
        kind.limits.check_batch(setup.runtime, config.max_batch_size, "max_batch_size")
    if config.inject_fault:
        parse_fault(config.inject_fault)
    try:
        parse_threshold_overrides(list(config.thresholds))
    except ValueError as exc:
        raise VitportError(str(exc)) from exc
    if config.weights and not Path(config.weights).exists():
        raise VitportError(f"weights={config.weights}: file not found", params=("weights=",))
    if config.check:
        open_source(config.reference)
    if engine == "local":
        for spec in config.device_list:
            resolve_device(spec)


def check_port(host: str, port: int) -> None:
    """Refuse an address this process cannot listen on."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise VitportError(
                f"cannot listen on {host}:{port} ({exc.strerror}); choose another port or host",
                params=("port", "host"),
            ) from exc


def parse_autoscale(text: str | None) -> dict | None:
    """``"MIN:MAX"`` -> Ray Serve's autoscaling config; None for none."""
    if not text:
        return None
    low, _, high = text.partition(":")
    if not (low.isdigit() and high.isdigit()) or int(low) > int(high) or int(high) < 1:
        raise VitportError(
            f"autoscale takes MIN:MAX replicas (e.g. 1:4), not {text!r}", params=("autoscale",)
        )
    return {"min_replicas": int(low), "max_replicas": int(high)}
