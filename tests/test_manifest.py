"""The port manifest, vitport.json: its JSON form and its refusals."""

from __future__ import annotations

import json

import pytest

from vitport.errors import VitportError, WeightsError
from vitport.port.manifest import MANIFEST, Manifest, check_weights, is_port, read_manifest

MANIFEST_FIELDS = {
    "source": "demo:dinov2-small",
    "weights_sha256": "ab" * 32,
    "weights_included": True,
    "family": "transformers/dinov2",
    "device_type": "cpu",
    "dtype": "bf16",
}


def test_a_manifest_reads_back_as_written(tmp_path) -> None:
    manifest = Manifest(
        **MANIFEST_FIELDS,
        fixes=("erf-gelu",),
        image_size=(224, 196),
        limits=({"group": "", "metric": "cosine", "limit": 0.99},),
        verdict={"passed": True, "checks": []},
    )
    manifest.write(tmp_path)
    assert is_port(tmp_path)
    assert read_manifest(tmp_path) == manifest
    assert read_manifest(tmp_path).passed


def test_a_directory_without_a_manifest_is_no_port(tmp_path) -> None:
    assert not is_port(tmp_path)
    assert read_manifest(tmp_path) is None


def test_a_broken_or_newer_manifest_is_refused_in_one_line(tmp_path) -> None:
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(VitportError, match="not a readable vitport port manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({**MANIFEST_FIELDS, "schema_version": 99}))
    with pytest.raises(VitportError, match="newer vitport"):
        read_manifest(tmp_path)


def test_weights_that_changed_are_refused() -> None:
    manifest = Manifest(**MANIFEST_FIELDS)
    check_weights(manifest, "ab" * 32, "port")
    with pytest.raises(WeightsError, match="do not match its vitport.json"):
        check_weights(manifest, "cd" * 32, "port")


def test_a_failed_runs_non_finite_numbers_are_strict_json(tmp_path) -> None:
    """A FAIL verdict can hold inf or NaN; vitport.json stays JSON that strict readers take."""
    manifest = Manifest(
        **MANIFEST_FIELDS,
        verdict={"passed": False, "checks": [{"value": float("nan"), "needed": float("inf")}]},
    )
    text = manifest.write(tmp_path).read_text()
    assert "NaN" not in text and "Infinity" not in text
    checks = json.loads(text, parse_constant=lambda c: pytest.fail(c))["verdict"]["checks"]
    assert checks == [{"value": "nan", "needed": "inf"}]
