"""The one Ray helper: it connects Ray for a block, and shuts down only what it connected."""

from __future__ import annotations

import sys
import types

import pytest

from vitport.cluster import ray_cluster
from vitport.errors import VitportError


class FakeRay(types.ModuleType):
    """Stands in for `ray`: records init and shutdown, as a session would see them."""

    def __init__(self, running: bool = False, refuse: bool = False) -> None:
        super().__init__("ray")
        self.running, self.refuse, self.calls = running, refuse, []

    def is_initialized(self) -> bool:
        return self.running

    def init(self, **kwargs) -> None:
        if self.refuse:
            raise ConnectionError("no cluster at that address\nmore")
        self.calls.append(("init", kwargs))
        self.running = True

    def shutdown(self) -> None:
        self.calls.append(("shutdown", {}))
        self.running = False


@pytest.fixture
def fake_ray(monkeypatch):
    def install(**kwargs) -> FakeRay:
        ray = FakeRay(**kwargs)
        monkeypatch.setitem(sys.modules, "ray", ray)
        monkeypatch.setitem(sys.modules, "ray.data", types.ModuleType("ray.data"))
        return ray

    return install


def test_a_session_it_starts_is_shut_down_after_the_block(fake_ray):
    ray = fake_ray()
    with ray_cluster("ray://head:10001", needs="Ray Data", module="ray.data", extra="ray") as got:
        assert got is ray and ray.running
    (name, options), (last, _) = ray.calls
    assert (name, last) == ("init", "shutdown")
    assert options["address"] == "ray://head:10001" and options["include_dashboard"] is False
    assert not ray.running


def test_a_session_already_running_is_joined_and_kept(fake_ray):
    ray = fake_ray(running=True)
    with ray_cluster(None, needs="Ray Data", module="ray.data", extra="ray"):
        pass
    assert ray.calls == [] and ray.running


def test_an_error_in_the_block_still_shuts_down(fake_ray):
    ray = fake_ray()
    with (
        pytest.raises(RuntimeError, match="boom"),
        ray_cluster(None, needs="Ray Data", module="ray.data", extra="ray"),
    ):
        raise RuntimeError("boom")
    assert [name for name, _ in ray.calls] == ["init", "shutdown"] and not ray.running


def test_no_cluster_is_one_line_naming_the_address(fake_ray):
    fake_ray(refuse=True)
    cluster = ray_cluster("ray://x:1", needs="Ray Data", module="ray.data", extra="ray")
    with pytest.raises(VitportError, match="cannot start or join Ray at ray://x:1") as caught:
        cluster.__enter__()
    assert "\n" not in str(caught.value)


def test_a_missing_ray_library_names_the_extra_that_installs_it(fake_ray, monkeypatch):
    fake_ray()
    monkeypatch.setitem(sys.modules, "ray.serve", None)  # import fails: not installed
    cluster = ray_cluster(None, needs="Ray Serve", module="ray.serve", extra="serve-ray")
    with pytest.raises(VitportError, match=r"needs Ray Serve: pip install 'vitport\[serve-ray\]'"):
        cluster.__enter__()
