"""The one cache root: an argument, else $VITPORT_CACHE, else ~/.cache/vitport."""

from __future__ import annotations

from pathlib import Path

from vitport.cache import cache_root
from vitport.runtimes import cache_dir


def test_the_cache_root_is_the_argument_then_the_variable_then_the_home_cache(
    monkeypatch, tmp_path
):
    monkeypatch.setenv("VITPORT_CACHE", str(tmp_path / "env"))
    assert cache_root(tmp_path / "given") == tmp_path / "given"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("VITPORT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "vitport"
    assert cache_root("~/elsewhere") == Path(tmp_path / "home" / "elsewhere")


def test_runtime_exports_live_under_the_one_root(monkeypatch, tmp_path):
    monkeypatch.setenv("VITPORT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path / "runtimes"
