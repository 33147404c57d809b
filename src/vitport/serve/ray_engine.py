"""`vitport serve --engine ray`: the same app on Ray Serve. Each replica is one device
(`num_gpus`, or Ray's `NPU` resource) running the same Service and batcher; Ray's own
autoscaling and backpressure options pass through. Needs `vitport[serve-ray]`."""

from __future__ import annotations

import dataclasses
import logging
import re
import signal
import threading
import time
from typing import Any

from vitport.cluster import ray_cluster
from vitport.device import Device
from vitport.errors import VitportError, one_line
from vitport.serve.config import ServeConfig

log = logging.getLogger("vitport.serve")
APP_NAME = "vitport"


class Capacity:
    """How much of the deployment serves, from Ray Serve's controller (asked at most every
    2 s): the replicas by state and, where their number is fixed, how many are wanted.
    A replica lost with its node shows as missing here until Ray Serve has replaced it."""

    def __init__(self, wanted: int | None) -> None:
        self.wanted = wanted
        self.asked, self.last = 0.0, {}

    def __call__(self) -> dict[str, Any]:
        if time.monotonic() - self.asked > 2.0:
            self.last, self.asked = self._ask(), time.monotonic()
        return self.last

    def _ask(self) -> dict[str, Any]:
        from ray import serve

        try:
            app = serve.status().applications[APP_NAME]
            deployment = next(iter(app.deployments.values()))
        except Exception as exc:  # the controller is away: say so, do not fail the probe
            return {"replicas": {}, "degraded": True, "detail": f"Ray Serve status: {exc}"}
        states = {str(k).split(".")[-1]: int(v) for k, v in deployment.replica_states.items()}
        running = states.get("RUNNING", 0)
        status = str(deployment.status).split(".")[-1]
        short = self.wanted is not None and running < self.wanted
        return {
            "replicas": states,
            "replicas_running": running,
            "replicas_wanted": self.wanted,
            "deployment_status": status,
            "degraded": short or status not in ("HEALTHY", "UPSCALING", "DOWNSCALING"),
        }


def replica_app(config: ServeConfig, wanted: int | None = None) -> Any:
    """Built on each replica: the app, loading and self-checking before it takes traffic."""
    from vitport.serve.app import create_app

    return create_app(config, background=False, capacity=Capacity(wanted))


def device_type(config: ServeConfig) -> str:
    """The one device type the replicas run on (each replica sees its own device)."""
    types = {re.split(r":", d.strip().lower())[0] for d in config.device_list}
    if len(types) != 1 or "auto" in types:
        raise VitportError(
            "engine='ray' needs one device type (device=cpu, cuda or npu); "
            "Ray places one replica per device",
            params=("engine='ray'", "device="),
        )
    return types.pop()


def default_replicas(kind: str, config: ServeConfig) -> int:
    """One per listed device, else one per device of that kind in the cluster."""
    import ray

    if config.devices:
        return len(config.devices)
    resource = Device(kind).ray_resource
    if resource is None:
        return 1
    return max(1, int(ray.cluster_resources().get(resource, 1)))


def deploy(
    config: ServeConfig,
    host: str,
    port: int,
    *,
    replicas: int | None = None,
    autoscaling: dict[str, Any] | None = None,
    max_ongoing_requests: int | None = None,
    max_queued_requests: int | None = None,
) -> Any:
    """Deploy on the Ray cluster this process is connected to; the app's handle."""
    from ray import serve

    kind = device_type(config)
    replica_config = dataclasses.replace(config, device=kind, devices=())
    options: dict[str, Any] = {
        "name": APP_NAME,
        "ray_actor_options": Device(kind).ray_actor_options(),
        "max_ongoing_requests": max_ongoing_requests or config.max_queue,
        "graceful_shutdown_timeout_s": config.drain_seconds,
        "health_check_period_s": 5,
    }
    if max_queued_requests is not None:
        options["max_queued_requests"] = max_queued_requests
    wanted = None
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        wanted = options["num_replicas"] = replicas or default_replicas(kind, config)

    def build() -> Any:  # Ray Serve calls a zero-argument builder on each replica
        return replica_app(replica_config, wanted)

    ingress = serve.ingress(build)
    deployment = serve.deployment(ingress(), **options)
    # one proxy, on the head node (one machine can hold several nodes); a request the proxy
    # holds longer than the service's own timeout plus a margin is answered, never left open
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": host, "port": port, "request_timeout_s": config.timeout + 30},
    )
    return serve.run(deployment.bind(), name=APP_NAME, route_prefix="/")


def run(
    config: ServeConfig, host: str, port: int, address: str | None = None, **options: Any
) -> None:
    """Deploy, serve until SIGTERM/SIGINT, then let Ray drain the replicas and shut down."""
    with ray_cluster(
        address, needs="Ray Serve", module="ray.serve", extra="serve-ray", log_to_driver=True
    ):
        from ray import serve

        stop = threading.Event()
        signals = (signal.SIGTERM, signal.SIGINT)
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in signals}
        try:
            try:
                deploy(config, host, port, **options)
            except Exception as exc:  # a replica that fails to load or to pass its check
                raise VitportError(
                    f"Ray Serve could not start {config.served_name}: {one_line(exc)}"
                ) from exc
            log.info("ready on Ray Serve at http://%s:%d", host, port)
            stop.wait()
            log.info(
                "draining: Ray Serve finishes accepted requests (up to %g s)", config.drain_seconds
            )
            serve.delete(APP_NAME)
            serve.shutdown()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
