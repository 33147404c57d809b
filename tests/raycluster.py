"""A real multi-node Ray cluster on this machine, started with `ray start` as a user starts one:
a head node without CPUs (Ray's advice for a head) and worker nodes, each its own raylet with
its own CPUs and resources, so that killing one raylet loses exactly that node."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


# the head's GCS declares a silent node dead after ~3-9 s, not Ray's default ~15-30 s: the same
# path, sooner (a user's cluster takes Ray's own time to notice a lost node)
FAST_DETECTION = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "3000",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, worker_cpus: list[int]) -> None:
        self.port = free_port()
        # its own temp dir: no other test's ray.init() finds this cluster, and stop() finds its
        # processes by it (a short path: Ray's socket paths must fit in 107 characters)
        self.temp = tempfile.mkdtemp(prefix="vr", dir="/tmp")
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_USAGE_STATS_ENABLED": "0",
            **FAST_DETECTION,
        }
        self.worker_cpus = worker_cpus

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ray(self, *args: str) -> None:
        done = subprocess.run(
            [RAY, *args], env=self.env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def start(self) -> Cluster:
        """`ray start` for the head, then each worker in turn (two raylets starting at once on
        two busy cores can time out); a cluster that fails to start is stopped."""
        try:
            self._ray("get-auth-token", "--generate")
            common = ("--temp-dir", self.temp, "--disable-usage-stats")
            self._ray(
                "start",
                "--head",
                f"--port={self.port}",
                "--num-cpus=0",
                "--include-dashboard=false",
                "--resources",
                json.dumps({"head": 1}),
                *common,
            )
            for k, cpus in enumerate(self.worker_cpus):
                self._ray(
                    "start",
                    f"--address={self.address}",
                    f"--num-cpus={cpus}",
                    "--resources",
                    json.dumps({f"worker_{k}": 1}),
                    *common,
                )
        except BaseException:
            self.stop()
            raise
        return self

    def _processes(self) -> set[psutil.Process]:
        found = set()
        for p in psutil.process_iter(["cmdline"]):
            if self.temp in " ".join(p.info["cmdline"] or []):
                found.add(p)
                with contextlib.suppress(psutil.Error):
                    found.update(p.children(recursive=True))
        return found

    def node_holding(self, title: str, timeout: float = 240) -> psutil.Process:
        """The raylet (the node) whose worker process has `title` in its name, e.g.
        "MapBatches(Encode)" for embed's model actor."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in psutil.process_iter(["cmdline"]):
                if title in " ".join(p.info["cmdline"] or []):
                    parent = p.parent()
                    if (
                        parent
                        and "raylet" in " ".join(parent.cmdline())
                        and self.temp in " ".join(parent.cmdline())
                    ):
                        return parent
            time.sleep(0.2)
        raise AssertionError(f"no process {title!r} on this cluster within {timeout} s")

    def stop(self) -> None:
        for _ in range(3):  # again, for anything started while the first pass killed
            for p in self._processes():
                with contextlib.suppress(psutil.Error):
                    p.kill()
            time.sleep(0.5)
        shutil.rmtree(self.temp, ignore_errors=True)
