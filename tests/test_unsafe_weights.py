"""A pickle with code in it gets one safe line, exit code 2, and its code never runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from test_cli import run


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path) -> Path:
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1), "payload": Payload(tmp_path / "PWNED")}, path)
    return path


def check(code: int, err: str, path: Path) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert str(path.name) in err and "not tensors" in err and "may run code" in err
    assert "safetensors" in err and "weights_only=False" not in err
    assert not (path.parent / "PWNED").exists()


def test_timm_weights_file(evil, monkeypatch, capsys):
    code, _, err = run(
        monkeypatch,
        capsys,
        "infer",
        "--model",
        "timm:vit_small_patch14_dinov2",
        "--weights",
        str(evil),
    )
    check(code, err, evil)


def test_transformers_directory(evil, tiny_dir, tmp_path, monkeypatch, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir("dinov2"), model)
    (model / "model.safetensors").unlink()
    shutil.copy(evil, model / "pytorch_model.bin")
    code, _, err = run(monkeypatch, capsys, "infer", "--model", str(model))
    check(code, err, model / "pytorch_model.bin")


def test_convert_source(evil, tmp_path, monkeypatch, capsys):
    code, _, err = run(
        monkeypatch, capsys, "convert", str(evil), "--to", "hf", "--out", str(tmp_path / "out")
    )
    check(code, err, evil)
