"""No output is replaced by accident: every command that writes refuses, in one line with exit
2, to replace an existing output without --overwrite, whoever wrote it; and what vitport writes
gets the modes of the user's umask."""

from __future__ import annotations

import json
import os
import re

import pytest
from test_cli import one_line_refusal, run

# a model that does not exist: a command that got past its output check would say so instead
NO_MODEL = "./no-such-model"


def test_infer_keeps_its_own_msprobe_dump(monkeypatch, capsys, tiny_dir, tmp_path):
    model = str(tiny_dir("vit"))
    dump = tmp_path / "dump"
    args = ("infer", "--model", model, "--device", "cpu", "--format", "msprobe", "--out", str(dump))
    code, _, err = run(monkeypatch, capsys, *args, "--block-images", "1")
    assert code == 0, err
    before = {p: p.stat().st_size for p in dump.rglob("*") if p.is_file()}
    line = one_line_refusal(*run(monkeypatch, capsys, *args)[::2])
    assert f"--out {dump} already holds vitport's output" in line and "--overwrite" in line
    assert {p: p.stat().st_size for p in dump.rglob("*") if p.is_file()} == before
    code, _, err = run(monkeypatch, capsys, *args, "--block-images", "2", "--overwrite")
    assert code == 0, err


def test_infer_overwrite_replaces_a_golden_file(monkeypatch, capsys, tiny_dir, tmp_path):
    from vitport.golden import read

    model = str(tiny_dir("dinov2"))
    golden = tmp_path / "golden.safetensors"
    first = tmp_path / "a.png"
    second = tmp_path / "b.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(first)
    Image.new("RGB", (32, 32), "blue").save(second)
    args = ("infer", "--model", model, "--device", "cpu", "--out", str(golden))
    assert run(monkeypatch, capsys, *args, str(first), str(second))[0] == 0
    line = one_line_refusal(*run(monkeypatch, capsys, *args, str(first))[::2])
    assert "already holds vitport's output" in line
    assert len(read(golden, ("patches",))["names"]) == 2  # the 2-image reference is still there
    assert run(monkeypatch, capsys, *args, str(first), "--overwrite")[0] == 0
    assert len(read(golden, ("patches",))["names"]) == 1


def test_report_out_holding_a_report_is_refused(monkeypatch, capsys, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"schema_version": 1}))
    (out / "README.md").write_text("an earlier report")
    line = one_line_refusal(
        *run(monkeypatch, capsys, "report", "--model", NO_MODEL, "--out", str(out))[::2]
    )
    assert f"--out {out} already holds vitport's output" in line and "--overwrite" in line
    assert (out / "README.md").read_text() == "an earlier report"


@pytest.mark.parametrize(
    ("command", "flag", "name", "text"),
    [
        ("bench", "--json", "b.json", json.dumps({"schema_version": 1})),
        ("compare", "--json", "c.json", json.dumps({"vitport_version": "0"})),
        ("bench", "--csv", "b.csv", None),
    ],
)
def test_vitports_own_records_are_kept(monkeypatch, capsys, tmp_path, command, flag, name, text):
    from vitport.bench.run import CSV_COLUMNS

    path = tmp_path / name
    path.write_text(text or ",".join(CSV_COLUMNS) + "\n")
    line = one_line_refusal(
        *run(monkeypatch, capsys, command, "--model", NO_MODEL, flag, str(path))[::2]
    )
    assert f"{flag} {path} already holds vitport's output" in line and "--overwrite" in line


def test_a_new_or_empty_output_needs_no_overwrite(monkeypatch, capsys, tiny_dir, tmp_path):
    model = str(tiny_dir("vit"))
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ("infer", "--model", model, "--device", "cpu", "--format", "msprobe")
    code, _, err = run(monkeypatch, capsys, *args, "--out", str(empty), "--block-images", "1")
    assert code == 0, err
    code, _, err = run(monkeypatch, capsys, "infer", "--model", model, "--out", str(tmp_path / "n"))
    assert code == 0, err


def test_the_atomic_write_gives_the_umask_modes(tmp_path):
    """Whatever modes the temporary file or folder had (mkstemp, mkdtemp and safetensors make
    them owner-only), what lands has the modes of any file the user writes."""
    from vitport.outputs import umask, write_atomic

    def private_file(tmp):
        tmp.write_text("x")
        tmp.chmod(0o600)

    def private_dir(tmp):
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "weights").write_text("x")
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        (tmp / "run.sh").chmod(0o700)
        for path in (tmp / "sub" / "weights", tmp / "sub", tmp):
            path.chmod(0o600 if path.is_file() else 0o700)

    mask = umask()
    assert mask == os.umask(mask)  # read without changing it
    write_atomic(tmp_path / "file", private_file)
    write_atomic(tmp_path / "dir", private_dir)
    mode = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "dir").rglob("*")}
    assert (tmp_path / "file").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "dir").stat().st_mode & 0o777 == 0o777 & ~mask
    assert mode == {"sub": 0o777 & ~mask, "weights": 0o666 & ~mask, "run.sh": 0o777 & ~mask}


# ------------------------------------------------------- --max-bytes holds for every format


def test_an_msprobe_dump_over_max_bytes_is_refused_before_writing(
    monkeypatch, capsys, tiny_dir, tmp_path
):
    model = str(tiny_dir("vit"))
    capsys.readouterr()  # the tiny model's build
    dump = tmp_path / "dump"
    args = ("infer", "--model", model, "--device", "cpu", "--format", "msprobe", "--out", str(dump))
    line = one_line_refusal(*run(monkeypatch, capsys, *args, "--max-bytes", "100000")[::2])
    assert re.search(r"an msprobe dump of 10 images would take about \d+\.\d MB", line), line
    assert "over --max-bytes 100000 (0.1 MB); lower --block-images or raise --max-bytes" in line
    assert not dump.exists()
    line = one_line_refusal(
        *run(monkeypatch, capsys, *args, "--max-bytes", "100000", "--block-images", "1")[::2]
    )
    assert "an msprobe dump of 1 image would take about" in line and not dump.exists()
    code, _, err = run(monkeypatch, capsys, *args, "--max-bytes", "100000000")
    assert code == 0, err


def test_the_dump_size_is_estimated_from_the_model(tiny_dir, photos, tmp_path):
    """The estimate, from one forward of 1 and one of 2 blank images, is the size written."""
    import vitport
    from vitport.msprobe.write import check_dump_size, dump_bytes, write_dump

    encoder = vitport.load(str(tiny_dir("dinov2")), device="cpu")
    for batch_size in (1, 3):
        images = [p.image for p in photos]
        batches = [
            encoder.preprocess(images[i : i + batch_size])
            for i in range(0, len(images), batch_size)
        ]
        estimate = dump_bytes(encoder, [len(b) for b in batches])
        assert check_dump_size(encoder, len(images), batch_size, estimate) == estimate
        write_dump(encoder, batches, tmp_path / str(batch_size))
        written = sum(f.stat().st_size for f in (tmp_path / str(batch_size)).rglob("*"))
        assert abs(estimate - written) < 0.05 * written, (batch_size, estimate, written)


def test_max_bytes_shows_as_an_integer(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "infer", "--help")
    assert code == 0 and "2000000000" in out and "2000000000.0" not in out
