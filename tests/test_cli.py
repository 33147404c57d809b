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


# ------------------------------------------------------- paths checked before the model loads


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a model loads: every refusal below must come before it."""
    import vitport

    def load(*args, **kwargs):
        raise AssertionError("the model loaded before the paths were checked")

    monkeypatch.setattr(vitport, "load", load)


def one_line_refusal(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "AssertionError" not in err, err
    return lines[0]


@pytest.fixture
def not_images(tmp_path):
    folder = tmp_path / "notimages"
    folder.mkdir()
    (folder / "notes.txt").write_text("text")
    (folder / "meta.json").write_text("{}")
    return folder


@pytest.mark.usefixtures("no_load")
def test_missing_or_non_image_inputs_are_refused_before_the_load(
    monkeypatch, capsys, tmp_path, not_images
):
    nope = tmp_path / "nope.jpg"
    foreign = tmp_path / "mine.json"
    foreign.write_text('{"not": "vitport"}')
    for args in (
        ("infer", "--model", "demo:dinov2-small", str(nope)),
        ("compare", "--model", "demo:dinov2-small", str(nope)),
        ("bench", "--model", "demo:dinov2-small", "--e2e", str(nope)),
        ("report", "--model", "demo:dinov2-small", "--out", str(tmp_path / "r"), str(nope)),
    ):
        line = one_line_refusal(*run(monkeypatch, capsys, *args)[::2])
        assert line == f"error: file not found: {nope}; check the path", args
    line = one_line_refusal(
        *run(monkeypatch, capsys, "infer", "--model", "demo:dinov2-small", str(not_images))[::2]
    )
    assert f"no images found in {not_images} (2 other files skipped: " in line
    assert ".jpg" in line and ".png" in line and ".webp" in line
    code, _, err = run(monkeypatch, capsys, "bench", "--model", "demo:dinov2-small", "--json",
                       str(foreign))  # fmt: skip
    assert "exists and was not written by vitport" in one_line_refusal(code, err)


@pytest.mark.usefixtures("no_load")
def test_embed_refuses_a_foreign_out_or_no_images_before_the_load(
    monkeypatch, capsys, tmp_path, not_images
):
    image = tmp_path / "a.png"
    Image.new("RGB", (20, 20), "red").save(image)
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.docx").write_text("a user's file")
    code, _, err = run(monkeypatch, capsys, "embed", str(image), "--model", "demo:dinov2-small",
                       "--out", str(out))  # fmt: skip
    assert "holds files vitport did not write" in one_line_refusal(code, err)
    code, _, err = run(monkeypatch, capsys, "embed", str(not_images), "--model",
                       "demo:dinov2-small", "--out", str(tmp_path / "new"))  # fmt: skip
    assert "no images found in" in one_line_refusal(code, err)


def test_embed_library_checks_its_store_before_loading(monkeypatch, tmp_path):
    import vitport
    import vitport.embed
    from vitport.errors import VitportError

    image = tmp_path / "a.png"
    Image.new("RGB", (20, 20), "red").save(image)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    monkeypatch.setattr(vitport, "load", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(VitportError, match="holds files vitport did not write"):
        vitport.embed.embed([str(image)], "demo:dinov2-small", out)
    with pytest.raises(VitportError, match="unknown fix"):
        vitport.embed.embed([str(image)], "demo:dinov2-small", tmp_path / "new", fixes=["nope"])


# ------------------------------------------------------- nothing vanishes


def test_infer_counts_non_image_files_of_a_directory(monkeypatch, capsys, tiny_dir, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 30), "red").save(photos / "good.png")
    (photos / "ok").write_text("no suffix")
    code, out, err = run(monkeypatch, capsys, "infer", "--model", str(tiny_dir("vit")),
                         str(photos))  # fmt: skip
    assert code == 0, err
    assert f"skipped {photos / 'ok'}: not an image" in err
    assert "1 image encoded, 1 skipped (not-an-image 1): listed above" in " ".join(out.split())
    code, _, _ = run(monkeypatch, capsys, "infer", "--model", str(tiny_dir("vit")), "--strict",
                     str(photos))  # fmt: skip
    assert code == 1


def test_compare_counts_skipped_inputs(monkeypatch, capsys, tiny_dir, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for colour in ("red", "blue"):
        Image.new("RGB", (40, 30), colour).save(photos / f"{colour}.png")
    (photos / "notes.txt").write_text("text")
    code, out, err = run(monkeypatch, capsys, "compare", "--model", str(tiny_dir("vit")),
                         str(photos))  # fmt: skip
    assert code == 0, err
    assert "notes.txt: not an image" in err
    assert "2 inputs compared, 1 skipped (not-an-image 1): listed above" in " ".join(out.split())


# ------------------------------------------------------- infer's latency column


def test_infer_latency_column_and_footer_say_what_they_are(monkeypatch, capsys, tiny_dir, tmp_path):
    for colour in ("red", "blue"):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{colour}.png")
    images = [str(tmp_path / "red.png"), str(tmp_path / "blue.png")]
    model = str(tiny_dir("vit"))
    code, out, err = run(monkeypatch, capsys, "infer", "--model", model, "--batch-size", "2",
                         *images)  # fmt: skip
    assert code == 0, err
    text = " ".join(out.split())
    assert "ms/image (batch ÷ n)" in text
    assert "divided by its n images; the first call, a batch of 2, took" in text
    code, out, err = run(monkeypatch, capsys, "infer", "--model", model, *images)
    text = " ".join(out.split())
    assert "ms/image" in text and "batch ÷ n" not in text
    assert "the first call (" in text and "includes warm-up" in text
