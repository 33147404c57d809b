"""Edges a user meets in the first hour (issue: names as written, nothing overwritten, golden
files by content, errors before the work, tables that fit, memory flat)."""

from __future__ import annotations

from test_cli import run


def test_names_with_brackets_are_printed_as_written(monkeypatch, capsys, tiny_dir, tmp_path):
    from vitport.images import sample_images

    photo = tmp_path / "scan [final].jpg"
    sample_images(1)[0].image.save(photo)
    code, out, err = run(monkeypatch, capsys, "infer", "--model", str(tiny_dir("dinov2")),
                         "--device", "cpu", str(photo), str(tmp_path / "gone [red].jpg"))  # fmt: skip
    assert code == 0, err
    assert "scan [final].jpg" in out and "gone [red].jpg: file not found" in err


def test_markup_in_a_spec_is_one_error_line(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "infer", "--model", "./nope[/x]")
    assert code == 2 and "Traceback" not in err and "MarkupError" not in err
    assert "./nope[/x]" in err


def test_modelscope_hint_keeps_its_brackets(monkeypatch, capsys):
    import importlib.util

    if importlib.util.find_spec("modelscope") is not None:
        return  # the hint only shows where modelscope is missing
    code, _, err = run(monkeypatch, capsys, "infer", "--model", "ms:org/name")
    assert code == 2 and "pip install 'vitport[modelscope]'" in err
