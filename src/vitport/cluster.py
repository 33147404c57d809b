"""The one way vitport starts, joins and stops Ray, for `embed --engine ray` and
`serve --engine ray` alike."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import ModuleType

from vitport.errors import VitportError, one_line


@contextlib.contextmanager
def ray_cluster(
    address: str | None,
    *,
    needs: str,
    module: str,
    extra: str,
    log_to_driver: bool = False,
    configure_logging: bool = True,
) -> Iterator[ModuleType]:
    """Ray, connected for the length of the block: the cluster at `address` joined, or a local
    one started when it is None; yields the `ray` module. Ray is shut down afterwards only if
    this call connected it, so a caller already inside a Ray session keeps its session.

    `needs` names what the caller uses ("Ray Data"), `module` the module that must import
    ("ray.data") and `extra` the vitport extra that installs it, for the one-line error where it
    is not installed."""
    try:
        import ray

        importlib.import_module(module)
    except ImportError as exc:
        raise VitportError(
            f"engine='ray' needs {needs}: pip install 'vitport[{extra}]'", params=("engine='ray'",)
        ) from exc
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=log_to_driver,
                configure_logging=configure_logging,
            )
        except Exception as exc:  # ConnectionError, RuntimeError, ...: all mean "no cluster"
            where = address or "local"
            raise VitportError(f"cannot start or join Ray at {where}: {one_line(exc)}") from exc
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
