"""Every vitport command on one model directory, as a user runs it. A family's test file calls
`check_every_command` with its tiny model, a fault to plant, where it must be found and the fix
that cures it (see tests/test_clip.py, tests/test_siglip.py)."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import torch

import vitport
from vitport.bench.flops import count_flops_by_profiler
from vitport.encoder import Encoder, Features

PHOTOS = 4


def image_files(directory: Path) -> list[Path]:
    """A few real photos saved as JPEG files."""
    from vitport.inputs import sample_images

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in sample_images(PHOTOS):
        path = directory / f"{image.name.removeprefix('skimage:')}.jpg"
        image.image.save(path, quality=90)
        paths.append(path)
    return paths


def profiled_flops(encoder: Encoder, batch: int = 2) -> float:
    """FLOPs of one image of the encoder's own forward, as torch's FlopCounterMode counts them."""
    pixels = torch.randn(batch, 3, *encoder.image_size, generator=torch.Generator().manual_seed(0))
    forward = encoder.forward_fn
    return count_flops_by_profiler(lambda x: forward(encoder.module, x), pixels) / batch


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from vitport.cli import main

    monkeypatch.setattr(sys, "argv", ["vitport", *args])
    monkeypatch.setenv("COLUMNS", "200")
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def check_every_command(
    model_dir: Path,
    images: list[Path],
    tmp_path: Path,
    monkeypatch,
    capsys,
    *,
    fault: str,
    culprit: str,
    cure: str,
) -> None:
    """infer, compare (localisation and fix trials on a planted fault), bench (FLOPs as torch
    counts them), convert to ONNX, embed, serve and report, each on `model_dir`."""
    model, files = str(model_dir), [str(p) for p in images]
    encoder = vitport.load(model)

    saved = tmp_path / "features.safetensors"
    code, _, err = cli(monkeypatch, capsys, "infer", "--model", model, *files, "--out", str(saved))
    assert code == 0, err
    feats = Features.load(saved)
    assert feats.pooled is not None and feats.names == files

    report = tmp_path / "compare.json"
    args = ("--model", model, "--device", "cpu", "--inject-fault", fault, "--json", str(report))
    args += ("-t", "rel_error=1e-4")  # tighter than fp32's limit, so the planted fault fails it
    code, out, err = cli(monkeypatch, capsys, "compare", *args, "--localize", "--try-fixes", *files)
    assert code == 1, out + err  # the planted fault fails the comparison
    result = json.loads(report.read_text())
    assert result["localization"]["culprit"] == culprit, result["localization"]["reason"]
    trials = {tuple(t["fixes"]): t for t in result["trials"]}
    assert trials[(cure,)]["verdict"]["passed"], trials[(cure,)]

    bench = tmp_path / "bench.json"
    code, _, err = cli(
        monkeypatch,
        capsys,
        "bench",
        "--model",
        model,
        "--device",
        "cpu",
        "--batch-sizes",
        "1",
        "--min-seconds",
        "0",
        "--warmup-seconds",
        "0",
        "--json",
        str(bench),
    )
    assert code == 0, err
    assert json.loads(bench.read_text())["flops"]["total"] == profiled_flops(encoder)

    code, out, err = cli(
        monkeypatch, capsys, "convert", model, "--to", "onnx", "--out", str(tmp_path / "onnx")
    )
    assert code == 0, out + err
    assert (tmp_path / "onnx" / "model.onnx").is_file()

    store = tmp_path / "embedded"
    code, out, err = cli(
        monkeypatch,
        capsys,
        "embed",
        *files,
        "--model",
        model,
        "--out",
        str(store),
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--quiet",
    )
    assert code == 0, out + err
    from vitport.embed import read

    rows = read(store, arrays=True)
    by_path = dict(zip(rows["path"], rows["pooled"], strict=True))
    embedded = torch.stack([torch.as_tensor(by_path[f]) for f in files]).float()
    torch.testing.assert_close(embedded, feats.pooled.float(), rtol=0, atol=1e-5)

    check_serve(model, images, feats.pooled)

    code, out, err = cli(
        monkeypatch,
        capsys,
        "report",
        "--model",
        model,
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "report"),
        "--batch-sizes",
        "1",
        "--min-seconds",
        "0.05",
    )
    assert code == 0, out + err
    assert "report written" in out and (tmp_path / "report" / "README.md").is_file()


def check_serve(model: str, images: list[Path], want: torch.Tensor) -> None:
    """The served embeddings, after the server's own self-check, equal infer's pooled output."""
    from fastapi.testclient import TestClient

    from vitport.serve import ServeConfig, create_app

    config = ServeConfig(model=model, device="cpu", max_batch_size=4)
    with TestClient(create_app(config, background=False)) as client:
        assert client.get("/ready").status_code == 200
        body = {
            "input": [base64.b64encode(p.read_bytes()).decode() for p in images],
            "encoding_format": "float",
        }
        answer = client.post("/v1/embeddings", json=body)
        assert answer.status_code == 200, answer.text
        got = torch.tensor([row["embedding"] for row in answer.json()["data"]])
    unit = torch.nn.functional.normalize(want.double(), dim=-1).float()  # served: unit norm
    torch.testing.assert_close(got, unit, rtol=0, atol=1e-5)
