"""The vitport command as a user runs it: output, saved features, one-line errors, exit codes."""

from __future__ import annotations

import sys

import pytest
from PIL import Image

from vitport import Features
from vitport.cli import main


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["vitport", *args])
    monkeypatch.setenv("COLUMNS", "200")
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_help_reads_like_a_manual(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "--help")
    assert code == 0
    for command in ("infer", "models", "devices"):
        assert command in out
    code, out, _ = run(monkeypatch, capsys, "infer", "--help")
    assert "--model" in out and "--dtype" in out and "--out" in out


def test_infer_prints_shapes_and_saves_features(monkeypatch, capsys, tiny_dir, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), "red").save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    out_file = tmp_path / "f.safetensors"
    code, out, err = run(
        monkeypatch, capsys, "infer", "--model", str(tiny_dir("dinov2_with_registers")),
        str(good), str(bad), "--out", str(out_file),
    )  # fmt: skip
    assert code == 0, err
    assert "registers" in out and "4 x 32" in out and "1 x 4 x 32" in out
    assert "broken.jpg" in err and "skipped" in err
    feats = Features.load(out_file)
    assert feats.names == [str(good)]
    assert feats.meta["skipped"][0][0] == str(bad)


def test_every_image_bad_is_an_error(monkeypatch, capsys, tiny_dir, tmp_path):
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    code, _, err = run(monkeypatch, capsys, "infer", "--model", str(tiny_dir("vit")), str(bad))
    assert code == 2
    assert "empty.png" in err and "none of the given images" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "nonsense spec"], "cannot understand model spec"),
        (["--model", "demo:nope"], "demo"),
        (["--model", "demo:dinov2-small", "--device", "cuda:3"], "not available"),
        (["--model", "demo:dinov2-small", "--dtype", "fp8"], "dtype"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, args, message):
    code, _, err = run(monkeypatch, capsys, "infer", *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["vitport", "--debug", "infer", "--model", "nonsense spec"])
    with pytest.raises(Exception, match="cannot understand model spec"):
        main()


def test_models_lists_sources(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "models")
    assert code == 0
    assert "demo:dinov2-small" in out and "timm:" in out and "dinov3_vit" in out


def test_devices_describes_the_machine(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "devices")
    assert code == 0
    assert "cpu" in out and "torch" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["infer"], "model"),  # a usage error: the missing option
        (["infer", "--model", "x", "--bogus"], "bogus"),
        (["bench", "--model", "x", "--min-seconds", "-1"], "min-seconds"),
        (["bench", "--model", "x", "--baseline", "/nonexistent.json"], "not found"),
        (["bench", "--model", "x", "--optimize", "--dtype", "bf16"], "drop --dtype"),
        (["bench", "--model", "x", "--e2e"], "--e2e needs image files"),
        (["compare", "--model", "x", "-r", "/tmp/nope/gold.safetensors"], "golden file"),
    ],
)
def test_usage_and_option_errors_exit_2(monkeypatch, capsys, args, message):
    code, out, err = run(monkeypatch, capsys, *args)
    assert code == 2
    assert message in out + err
    assert "Traceback" not in out + err


def test_baseline_from_another_configuration_is_refused(monkeypatch, capsys, tmp_path, tiny_dir):
    import json

    baseline = tmp_path / "b.json"
    code, _, err = run(monkeypatch, capsys, "bench", "--model", str(tiny_dir("vit")), "--device",
                       "cpu", "--batch-sizes", "1", "--min-seconds", "0.05", "--warmup-seconds",
                       "0", "--json", str(baseline))  # fmt: skip
    assert code == 0, err
    assert json.loads(baseline.read_text())["dtype"] == "fp32"
    code, _, err = run(monkeypatch, capsys, "bench", "--model", str(tiny_dir("vit")), "--dtype",
                       "bf16", "--baseline", str(baseline))  # fmt: skip
    assert code == 2 and "compare like with like" in err


def test_out_must_be_a_file(monkeypatch, capsys, tmp_path, tiny_dir):
    code, _, err = run(monkeypatch, capsys, "infer", "--model", str(tiny_dir("vit")), "--out",
                       str(tmp_path))  # fmt: skip
    assert code == 2 and "is a directory" in err


@pytest.mark.parametrize("command", ["infer", "compare", "bench", "report", "convert", "embed"])
def test_every_command_that_loads_a_model_takes_the_model_options(command):
    """The shared model options, through the same aliases, on every command that loads one."""
    import typer

    from vitport.cli import app

    group = typer.main.get_command(app)
    options = {opt for param in group.commands[command].params for opt in param.opts}
    assert {"--weights", "--trust-remote-code", "--image-size"} <= options
