"""`vitport.json`: what a packaged port is, and the proof it brings.

A directory (or hub repository) holding this file is a port. Loading it applies its dtype and
fixes; comparing it with no reference uses its golden file; its weights must still hash to the
recorded sha256.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitport import records
from vitport.errors import VitportError, WeightsError

MANIFEST = "vitport.json"
GOLDEN = "golden.safetensors"
WEIGHTS = "model.safetensors"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """The port manifest, one field per fact; `to_dict`/`from_dict` are its JSON form."""

    source: str  # the spec the port was made from
    weights_sha256: str  # vitport.families.weights_sha256 of the weights as loaded
    weights_included: bool  # False: --no-weights, load `source` and check the sha256
    family: str
    device_type: str  # "cpu", "cuda", "npu", ...
    dtype: str  # the port's dtype name, e.g. "bf16"
    fixes: tuple[str, ...] = ()
    runtime: str = "torch"
    attention: str = "default"
    image_size: tuple[int, int] = (224, 224)
    limits: tuple[dict[str, Any], ...] = ()  # the thresholds the verdict applied
    verdict: dict[str, Any] = field(default_factory=dict)  # {"passed": bool, "checks": [...]}
    allow_fail: bool = False  # packaged (and published) although the verdict is FAIL
    golden: str = GOLDEN  # the golden file's name inside the port
    reference: dict[str, str] = field(default_factory=dict)  # the golden's: kind, device, dtype
    inputs_sha256: tuple[str, ...] = ()  # content hashes of the golden file's images
    environment: dict[str, str] = field(default_factory=dict)  # device description, versions
    vitport_version: str = ""
    created: str = ""
    lang: str = "en"  # the language of the port's README
    schema_version: int = SCHEMA_VERSION

    @property
    def passed(self) -> bool:
        return bool(self.verdict.get("passed"))

    def to_dict(self) -> dict[str, Any]:
        return records.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return records.from_dict(
            cls,
            data,
            image_size=lambda v: tuple(int(x) for x in v),
            limits=lambda v: tuple(dict(x) for x in v),
            verdict=dict,
            environment=dict,
            reference=dict,
        )

    def write(self, directory: Path) -> Path:
        from vitport.outputs import write_text

        path = Path(directory) / MANIFEST
        write_text(
            path, json.dumps(records.json_safe(self.to_dict()), indent=2, allow_nan=False) + "\n"
        )
        return path


def is_port(directory: str | Path) -> bool:
    """Whether `directory` holds a port manifest."""
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: str | Path) -> Manifest | None:
    """The manifest of the port in `directory`; None where it is not a port."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        manifest = Manifest.from_dict(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise VitportError(
            f"{path} is not a readable vitport port manifest ({type(exc).__name__}: {exc}); "
            "write the port again with vitport report --package"
        ) from exc
    if manifest.schema_version > SCHEMA_VERSION:
        raise VitportError(
            f"{path} was written by a newer vitport (manifest schema {manifest.schema_version}); "
            "upgrade vitport"
        )
    return manifest


def check_weights(manifest: Manifest, sha256: str, where: str) -> None:
    """Refuse weights that no longer hash to what the port recorded."""
    if sha256 != manifest.weights_sha256:
        raise WeightsError(
            f"the weights of {where} do not match its vitport.json (sha256 {sha256[:12]}… "
            f"against {manifest.weights_sha256[:12]}…); the port was changed after it was "
            "packaged: package it again with vitport report --package"
        )
