"""vitport embed: one row or one error per input, resumable after SIGKILL, the same rows from
every engine and every split of the work."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import vitport
from vitport.cli.flags import cli_message
from vitport.embed import embed, read
from vitport.errors import VitportError

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "motorcycle")


def save_photos(directory: Path, names=PHOTOS, copies: int = 1) -> list[Path]:
    from vitport.inputs import sample_images

    directory.mkdir(parents=True, exist_ok=True)
    images = {im.name.removeprefix("skimage:"): im.image for im in sample_images(8)}
    paths = []
    for copy in range(copies):
        for i, name in enumerate(names):
            sub = directory / ("sub" if i % 2 else "") / (f"c{copy}" if copies > 1 else "")
            sub.mkdir(parents=True, exist_ok=True)
            path = sub / f"{name}.jpg"
            images[name].save(path, quality=90)
            paths.append(path)
    return paths


def bad_inputs(directory: Path) -> dict[str, str]:
    """Every kind of bad input, with the reason category embed must give it."""
    (directory / "empty.jpg").write_bytes(b"")
    (directory / "notes.png").write_text("not an image at all")
    good = (directory / "astronaut.jpg").read_bytes()
    (directory / "cut.jpg").write_bytes(good[: len(good) // 3])
    Image.new("RGB", (1500, 1500)).save(directory / "huge.png")  # a bomb under the test limit
    corrupt = bytearray(good)
    corrupt[200:2000] = b"\x00" * 1800
    (directory / "garbled.jpg").write_bytes(bytes(corrupt[:400]))
    return {
        "empty.jpg": "empty",
        "notes.png": "not-an-image",
        "cut.jpg": "truncated",
        "huge.png": "too-large",
        "garbled.jpg": "corrupt",
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from conftest import TINY

    path = tmp_path_factory.mktemp("tiny-reg")
    TINY["dinov2_with_registers"].build(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    save_photos(root)
    return root


def test_good_rows_and_an_error_row_with_its_reason_for_each_bad_input(
    model_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    source = tmp_path / "mixed"
    save_photos(source)
    expected = bad_inputs(source)
    summary = embed(
        [str(source)],
        str(model_dir),
        tmp_path / "out",
        device="cpu",
        batch_size=3,
        workers=0,
        shard_size=4,
    )
    assert summary.embedded == len(PHOTOS) and summary.errors == len(expected)
    assert summary.embedded + summary.errors == summary.inputs and summary.complete
    assert summary.error_reasons == {
        "corrupt": 1,
        "empty": 1,
        "not-an-image": 1,
        "too-large": 1,
        "truncated": 1,
    }
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    assert {e["id"]: e["reason"] for e in errors} == expected
    assert all(e["message"] and e["path"].endswith(e["id"]) for e in errors)
    table = read(tmp_path / "out")
    assert table.column_names == ["id", "path", "width", "height", "cls", "pooled"]
    assert len(set(table.column("id").to_pylist())) == len(PHOTOS)
    assert "sub/chelsea.jpg" in table.column("id").to_pylist()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 11, "embedded": 6, "errors": 5}
    assert manifest["complete"] is True
    settings = manifest["settings"]
    for key in ("model", "weights_sha256", "family", "device", "dtype", "fixes", "preprocessing"):
        assert key in settings
    assert settings["outputs"] == {"cls": [32], "pooled": [32]}


def test_features_equal_infer_on_the_same_images(model_dir, photos, tmp_path):
    from vitport.infer import infer
    from vitport.inputs import read_images

    embed(
        [str(photos)],
        str(model_dir),
        tmp_path / "out",
        device="cpu",
        batch_size=2,
        workers=2,
        outputs="cls,pooled,registers,patches",
    )
    data = read(tmp_path / "out", arrays=True)
    encoder = vitport.load(str(model_dir))
    images, _ = read_images([photos / Path(i) for i in data["id"]])
    feats = infer(encoder, images, batch_size=2).features
    torch.testing.assert_close(torch.from_numpy(data["cls"]), feats.cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        torch.from_numpy(data["registers"]), feats.registers, atol=1e-5, rtol=1e-5
    )
    assert data["registers"].shape == (len(PHOTOS), 4, 32)  # the shape from the metadata
    from safetensors.numpy import load_file

    patches = load_file(str(tmp_path / "out" / "patches-00000.safetensors"))
    torch.testing.assert_close(
        torch.from_numpy(patches[data["id"][0]]), feats.patches[0], atol=1e-5, rtol=1e-5
    )
    w, h = images[0].image.size
    assert (data["width"][0], data["height"][0]) == (w, h)


def test_parquet_and_list_sources(model_dir, photos, tmp_path):
    files = sorted(photos.rglob("*.jpg"))
    table = pa.table(
        {
            "path": [str(p.relative_to(photos)) for p in files],
            "image": [p.read_bytes() for p in files[:-1]] + [b""],
        }
    )
    pq.write_table(table, photos / "index.parquet")
    try:
        by_path = embed(
            [str(photos / "index.parquet")],
            str(model_dir),
            tmp_path / "a",
            device="cpu",
            batch_size=4,
            workers=0,
        )
        by_bytes = embed(
            [str(photos / "index.parquet")],
            str(model_dir),
            tmp_path / "b",
            device="cpu",
            batch_size=4,
            workers=2,
            column="image",
        )
    finally:
        (photos / "index.parquet").unlink()
    assert by_path.embedded == len(files) and by_bytes.embedded == len(files) - 1
    a, b = read(tmp_path / "a", arrays=True), read(tmp_path / "b", arrays=True)
    assert a["id"][:2] == ["index.parquet:0", "index.parquet:1"]
    np.testing.assert_allclose(a["pooled"][: len(b["id"])], b["pooled"], atol=1e-6)
    errors = pq.read_table(tmp_path / "b" / "errors.parquet").to_pylist()
    assert [(e["id"], e["reason"]) for e in errors] == [
        (f"index.parquet:{len(files) - 1}", "empty")
    ]

    listing = tmp_path / "list.txt"
    listing.write_text("# photos\n" + "\n".join(str(p) for p in files[:3]) + "\n\n")
    listed = embed([f"@{listing}"], str(model_dir), tmp_path / "c", device="cpu", batch_size=4)
    assert listed.embedded == 3


def test_another_model_or_setting_is_refused_naming_the_difference(
    model_dir, photos, tmp_path, tiny_dir
):
    out = tmp_path / "out"
    embed([str(photos)], str(model_dir), out, device="cpu", batch_size=4)
    with pytest.raises(VitportError, match="another weights sha256"):
        embed([str(photos)], str(tiny_dir("dinov2")), out, device="cpu", batch_size=4)
    with pytest.raises(VitportError, match="another dtype"):
        embed([str(photos)], str(model_dir), out, device="cpu", dtype="bf16", batch_size=4)
    with pytest.raises(VitportError, match="another outputs"):
        embed([str(photos)], str(model_dir), out, device="cpu", outputs="pooled", batch_size=4)
    again = embed(
        [str(photos)], str(tiny_dir("dinov2")), out, device="cpu", batch_size=4, overwrite=True
    )
    assert again.complete and again.skipped_done == 0


def test_a_directory_vitport_did_not_write_is_never_touched(model_dir, photos, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(VitportError, match="did not write"):
        embed([str(photos)], str(model_dir), out, device="cpu", batch_size=4, overwrite=True)
    assert (out / "thesis.tex").read_text() == "precious"


def test_two_shard_halves_equal_one_whole_run(model_dir, photos, tmp_path):
    whole = embed(
        [str(photos)], str(model_dir), tmp_path / "whole", device="cpu", batch_size=2, shard_size=2
    )
    first = embed(
        [str(photos)],
        str(model_dir),
        tmp_path / "split",
        device="cpu",
        batch_size=2,
        shard_size=2,
        shard="0/2",
    )
    assert not first.complete and first.embedded == 4
    second = embed(
        [str(photos)],
        str(model_dir),
        tmp_path / "split",
        device="cpu",
        batch_size=2,
        shard_size=2,
        shard="1/2",
    )
    assert second.complete and whole.complete
    assert read(tmp_path / "split").equals(read(tmp_path / "whole"))


def test_disk_full_keeps_written_shards_and_resumes(model_dir, photos, tmp_path, monkeypatch):
    import errno

    from vitport.embed import store

    real = store._write_part
    calls = {"n": 0}

    def flaky(table, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(table, path)

    monkeypatch.setattr(store, "_write_part", flaky)
    out = tmp_path / "out"
    with pytest.raises(VitportError, match="disk full while writing shard 1.*stay valid"):
        embed([str(photos)], str(model_dir), out, device="cpu", batch_size=2, shard_size=2)
    assert len(read(out)) == 2  # shard 0 is whole and readable
    assert not list(out.glob(".*.tmp-*"))
    monkeypatch.setattr(store, "_write_part", real)
    resumed = embed([str(photos)], str(model_dir), out, device="cpu", batch_size=2, shard_size=2)
    assert resumed.complete and resumed.skipped_done == 2 and len(read(out)) == len(PHOTOS)


@pytest.mark.slow
def test_ray_engine_writes_the_same_rows(model_dir, photos, tmp_path, one_ray_at_a_time):
    pytest.importorskip("ray")
    local = tmp_path / "local"
    embed(
        [str(photos)],
        str(model_dir),
        local,
        device="cpu",
        batch_size=2,
        shard_size=4,
        outputs="cls,pooled,registers",
    )
    summary = embed(
        [str(photos)],
        str(model_dir),
        tmp_path / "ray",
        device="cpu",
        batch_size=2,
        shard_size=4,
        engine="ray",
        outputs="cls,pooled,registers",
    )
    assert summary.complete and summary.engine == "ray"
    a, b = read(local, arrays=True), read(tmp_path / "ray", arrays=True)
    assert a["id"] == b["id"] and a["width"] == b["width"]
    for name in ("cls", "pooled", "registers"):
        np.testing.assert_allclose(a[name], b[name], atol=1e-5)


def test_dedup_finds_the_copy_and_blocks_agree_with_brute_force(
    model_dir, photos, tmp_path, monkeypatch
):
    from vitport.embed import dedup

    source = tmp_path / "dups"
    save_photos(source)
    (source / "again.jpg").write_bytes((source / "astronaut.jpg").read_bytes())
    embed([str(source)], str(model_dir), tmp_path / "out", device="cpu", batch_size=4)
    pairs = dedup.near_duplicates(tmp_path / "out", 0.999, method="torch")
    assert ("again.jpg", "astronaut.jpg") in [(a, b) for a, b, _ in pairs.top(10)]

    faiss_pairs = (
        dedup.near_duplicates(tmp_path / "out", 0.5, method="faiss") if _has_faiss() else None
    )
    if faiss_pairs is not None:  # FAISS (a dev dependency) and the tiles agree pair for pair
        torch_pairs = dedup.near_duplicates(tmp_path / "out", 0.5, method="torch")
        assert (faiss_pairs.a, faiss_pairs.b) == (torch_pairs.a, torch_pairs.b)

    vectors = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    monkeypatch.setattr(dedup, "BLOCK", 7)  # many tiles, ragged edges
    rows, cols, sims = dedup._pairs_torch(vectors, 0.3)
    full = vectors @ vectors.T
    want = {(i, j) for i in range(50) for j in range(i + 1, 50) if full[i, j] >= 0.3}
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == want
    np.testing.assert_allclose(sims, full[rows, cols], atol=1e-6)


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def test_cli_embed_and_dedup(model_dir, photos, tmp_path, monkeypatch, capsys):
    from test_cli import run

    out = tmp_path / "out"
    code, stdout, _ = run(
        monkeypatch,
        capsys,
        "embed",
        str(photos),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--quiet",
    )
    assert code == 0 and f"{len(PHOTOS)} embedded, 0 in errors.parquet" in stdout
    code, stdout, _ = run(
        monkeypatch,
        capsys,
        "dedup",
        str(out),
        "--threshold",
        "0.0",
        "--out",
        str(tmp_path / "pairs.parquet"),
    )
    assert code == 0 and "pairs with cosine" in stdout
    assert pq.read_table(tmp_path / "pairs.parquet").column_names == ["id_a", "id_b", "cosine"]
    again = ("dedup", str(out), "--threshold", "0.5", "--out", str(tmp_path / "pairs.parquet"))
    code, _, err = run(monkeypatch, capsys, *again)  # an earlier run's pairs are kept
    assert code == 2 and "already holds vitport's output" in err and "--overwrite" in err
    assert run(monkeypatch, capsys, *again, "--overwrite")[0] == 0
    code, _, err = run(
        monkeypatch,
        capsys,
        "embed",
        str(photos),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--dtype",
        "bf16",
        "--batch-size",
        "2",
    )
    assert code == 2 and "another dtype" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A real SIGKILL of the process while it writes; the same command again finishes the job."""
    source = tmp_path / "many"
    save_photos(source, copies=6)  # 36 photos, 18 shards of 2
    command = [
        sys.executable,
        "-m",
        "vitport",
        "embed",
        str(source),
        "--model",
        "demo:dinov2-small",
        "--device",
        "cpu",
        "--batch-size",
        "1",
        "--workers",
        "1",
        "--shard-size",
        "2",
        "--quiet",
        "--out",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(vitport.__file__).parents[1])}
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*command, str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not list(killed.glob("part-0000[2-9].parquet")):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(list(killed.glob("part-*.parquet")))
    (
        killed / ".part-00017.parquet.tmp-{}-999999999".format(__import__("socket").gethostname())
    ).write_bytes(b"half")
    assert 3 <= written < 18
    assert json.loads((killed / "manifest.json").read_text())["complete"] is False
    subprocess.run([*command, str(killed)], env=env, check=True, capture_output=True)
    whole = tmp_path / "whole"
    subprocess.run([*command, str(whole)], env=env, check=True, capture_output=True)
    resumed, uninterrupted = read(killed), read(whole)
    ids = resumed.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 36
    assert resumed.equals(uninterrupted)
    assert json.loads((killed / "manifest.json").read_text())["complete"] is True
    assert not list(killed.glob(".*.tmp-*"))  # a killed run's half-written file is cleared


def test_out_that_cannot_be_written_is_one_clear_error(model_dir, photos, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(VitportError, match="cannot write"):
        embed([str(photos)], str(model_dir), blocker / "out", device="cpu", batch_size=4)


def test_review_edges(model_dir, photos, tmp_path):
    from vitport.embed import dedup

    out = tmp_path / "out"
    embed([str(photos)], str(model_dir), out, device="cpu", batch_size=4, outputs="pooled")
    with pytest.raises(VitportError, match="has no 'cls' column"):
        dedup.near_duplicates(out, 0.9, column="cls")
    moved = tmp_path / "other"
    save_photos(moved)  # the same names in another folder: another set of inputs
    with pytest.raises(VitportError, match="another inputs sha256"):
        embed([str(moved)], str(model_dir), out, device="cpu", batch_size=4, outputs="pooled")
    with pytest.raises(VitportError, match=r"^overwrite=True with shard=\.\.\. would") as caught:
        embed([str(photos)], str(model_dir), out, device="cpu", overwrite=True, shard="0/2")
    assert cli_message(caught.value).startswith("--overwrite with --shard would let each task")
    empty = tmp_path / "bad"
    empty.mkdir()
    (empty / "a.jpg").write_bytes(b"")
    embed([str(empty)], str(model_dir), tmp_path / "none", device="cpu", batch_size=4)
    assert len(dedup.near_duplicates(tmp_path / "none", 0.9)) == 0  # every input failed


def test_non_image_files_of_a_directory_are_rows_of_errors_parquet(model_dir, tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    Image.new("RGB", (40, 30), "red").save(source / "a.png")
    (source / "ok").write_text("no suffix")
    (source / "notes.txt").write_text("text")
    summary = embed(
        [str(source)], str(model_dir), tmp_path / "out", device="cpu", batch_size=2, workers=0
    )
    assert (summary.inputs, summary.embedded, summary.errors) == (3, 1, 2)
    assert summary.error_reasons == {"not-an-image": 2}
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    assert {e["id"]: e["reason"] for e in errors} == {
        "notes.txt": "not-an-image",
        "ok": "not-an-image",
    }
    assert all("not an image" in e["message"] for e in errors)


def test_the_manifest_names_the_resampling_and_older_manifests_still_resume(
    model_dir, photos, tmp_path
):
    out = tmp_path / "out"
    embed([str(photos)], str(model_dir), out, device="cpu", batch_size=4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["preprocessing"]["resample"] == "bicubic"
    manifest["settings"]["preprocessing"]["resample"] = "3"  # as written before it had names
    (out / "manifest.json").write_text(json.dumps(manifest))
    again = embed([str(photos)], str(model_dir), out, device="cpu", batch_size=4)
    assert again.complete and again.skipped_done == len(PHOTOS) and again.written_now == 0


def test_cli_embed_says_which_batch_size_it_chose_and_why(model_dir, tmp_path, monkeypatch, capsys):
    from test_cli import run

    source = tmp_path / "three"
    save_photos(source, names=PHOTOS[:3])
    code, stdout, err = run(
        monkeypatch,
        capsys,
        "embed",
        str(source),
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--quiet",
    )
    assert code == 0, err
    assert stdout.startswith("\n3 embedded, 0 in errors.parquet, of 3 inputs")  # a blank line
    chosen = next(line for line in stdout.splitlines() if line.startswith("batch "))
    # 1 and 2 measured; 4 would be larger than the 3 images, so it is not tried
    assert "the fastest of 1, 2 in a short sweep on cpu" in chosen, stdout
    assert "larger batches than the 3 images to embed gain nothing" in stdout.replace("\n", " ")
    code, stdout, _ = run(
        monkeypatch,
        capsys,
        "embed",
        str(source / "astronaut.jpg"),
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "one"),
        "--device",
        "cpu",
        "--batch-size",
        "1",
        "--quiet",
    )
    assert code == 0 and "of 1 input (" in stdout and "this run: 1 input in" in stdout
    assert "batch 1: given (--batch-size)" in stdout


def test_the_batch_sweep_for_one_image_says_image(tiny_dir):
    import vitport
    from vitport.embed import auto_batch_size

    size, why = auto_batch_size(vitport.load(str(tiny_dir("dinov2"))), 1)
    assert size == 1 and "than the 1 image to embed" in why


def interrupt_at_batch(monkeypatch, number: int) -> None:
    """Ctrl-C as the model starts on batch `number` (as Python raises it: KeyboardInterrupt)."""
    import vitport.embed as embed_module

    real, calls = embed_module.features_of, {"n": 0}

    def features_of(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == number:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(embed_module, "features_of", features_of)


def test_an_interrupt_keeps_what_is_done_and_the_same_call_resumes(
    model_dir, photos, tmp_path, monkeypatch
):
    """Ctrl-C in the middle of a shard: its rows so far are kept as a piece of it (patches
    too), the message says how many and that the same call resumes; the resumed directory is
    the one an uninterrupted run writes, pieces gone."""
    from safetensors import safe_open

    from vitport.embed import Interrupted

    out, whole = tmp_path / "out", tmp_path / "whole"
    options = {"device": "cpu", "batch_size": 1, "outputs": "cls,patches", "shard_size": 4}
    interrupt_at_batch(monkeypatch, 5)  # shard 0 (inputs 0-3) whole, shard 1 not begun
    with pytest.raises(Interrupted, match=rf"^4 of 6 inputs kept in {out}; run the same"):
        embed([str(photos)], str(model_dir), out, **options)
    assert len(read(out)) == 4 and not list(out.glob("part-00001*"))
    monkeypatch.undo()
    options["shard_size"] = 10_000  # one shard: now the interrupts fall inside it
    embed([str(photos)], str(model_dir), whole, **options)
    out = tmp_path / "one"
    interrupt_at_batch(monkeypatch, 3)
    with pytest.raises(Interrupted, match=r"^2 of 6 inputs kept in .*; run the same command"):
        embed([str(photos)], str(model_dir), out, **options)
    monkeypatch.undo()
    interrupt_at_batch(monkeypatch, 3)  # resumed, and interrupted again: a second piece
    with pytest.raises(Interrupted, match=r"^4 of 6 inputs kept"):
        embed([str(photos)], str(model_dir), out, **options)
    assert sorted(p.name for p in out.glob("part-*")) == [
        "part-00000.000000000-000000002.parquet",
        "part-00000.000000002-000000004.parquet",
    ]
    kept = read(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["embedded"] == len(kept) == 4 and not manifest["complete"]
    assert kept.equals(read(whole).slice(0, 4))
    monkeypatch.undo()
    resumed = embed([str(photos)], str(model_dir), out, **options)
    assert resumed.complete and resumed.skipped_done == 4 and resumed.written_now == 2
    assert read(out).equals(read(whole)) and len(read(out)) == len(PHOTOS)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())
    with safe_open(str(out / "patches-00000.safetensors"), "np") as f:
        assert sorted(f.keys()) == sorted(read(out).column("id").to_pylist())


def test_the_batch_size_sweep_shows_what_it_measured_as_it_runs(model_dir, tmp_path):
    """Each step of the sweep says it is the sweep, the size it tries, and the speed of the
    size before: a sweep that takes minutes is seen while it runs, not only in the summary."""
    source = tmp_path / "three"
    save_photos(source, names=PHOTOS[:3])
    said: list[str] = []
    summary = embed(
        [str(source)], str(model_dir), tmp_path / "out", device="cpu", progress=said.append
    )
    sweep = [m for m in said if m.startswith("finding a batch size that fits: ")]
    assert [m.split(": ", 1)[1].split(" (")[0] for m in sweep] == ["batch 1", "batch 2"], said
    assert re.fullmatch(r".*: batch 2 \(batch 1: \d+\.\d img/s\)", sweep[1]), sweep
    assert summary.batch_size_reason.startswith("the fastest of 1, 2 in a short sweep")


# a run of `vitport embed` whose model, on its third batch, says so in a file and waits there
PAUSED_AT_THIRD_BATCH = """
import sys, time
from pathlib import Path

import vitport.embed as embed_module

real, calls, marker = embed_module.features_of, [0], Path(sys.argv[1])


def features_of(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        marker.write_text("two batches are in")
        while True:
            time.sleep(0.01)
    return real(*args, **kwargs)


embed_module.features_of = features_of
from vitport.cli import main

sys.argv = ["vitport", *sys.argv[2:]]
main()
"""


@pytest.mark.slow
def test_ctrl_c_keeps_the_batches_done_and_says_the_same_command_resumes(
    model_dir, photos, tmp_path
):
    """A real SIGINT to the process group, as Ctrl-C sends it, once two batches are in (seen
    by a file, not by waiting a while): exit 130, one line saying what is kept and that the
    same command resumes; the same command then finishes, as an uninterrupted run would."""
    driver, marker = tmp_path / "driver.py", tmp_path / "two-batches-in"
    driver.write_text(PAUSED_AT_THIRD_BATCH)
    args = ["embed", str(photos), "--model", str(model_dir), "--device", "cpu"]
    args += ["--batch-size", "2", "--workers", "1", "--out"]
    env = {**os.environ, "PYTHONPATH": str(Path(vitport.__file__).parents[1]), "COLUMNS": "300"}
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, str(driver), str(marker), *args, str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        f"interrupted: 4 of 6 inputs kept in {out}; run the same command again to resume"
    ), err
    assert len(read(out)) == 4 and [p.name for p in out.glob("part-*")] == [
        "part-00000.000000000-000000004.parquet"
    ]
    assert not list(out.glob(".*.tmp-*"))
    vitport_cli = [sys.executable, "-m", "vitport", *args]
    resumed = subprocess.run([*vitport_cli, str(out)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed: 4 inputs were already written" in resumed.stdout
    whole = tmp_path / "whole"
    subprocess.run([*vitport_cli, str(whole)], env=env, check=True, capture_output=True)
    assert read(out).equals(read(whole)) and len(read(out)) == len(PHOTOS)
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
