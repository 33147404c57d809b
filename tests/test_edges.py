"""Edges a user meets in the first hour (issue: names as written, nothing overwritten, golden
files by content, errors before the work, tables that fit, memory flat)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import run


def test_names_with_brackets_are_printed_as_written(monkeypatch, capsys, tiny_dir, tmp_path):
    from vitport.inputs import sample_images

    photo = tmp_path / "scan [final].jpg"
    sample_images(1)[0].image.save(photo)
    code, out, err = run(
        monkeypatch,
        capsys,
        "infer",
        "--model",
        str(tiny_dir("dinov2")),
        "--device",
        "cpu",
        str(photo),
        str(tmp_path / "gone [red].jpg"),
    )
    assert code == 0, err
    assert "scan [final].jpg" in out and "gone [red].jpg: file not found" in err


def test_markup_in_a_spec_is_one_error_line(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "infer", "--model", "./nope[/x]")
    assert code == 2 and "Traceback" not in err and "MarkupError" not in err
    assert "./nope[/x]" in err


def test_models_list_keeps_brackets(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "models")
    assert code == 0 and "pip install 'vitport[modelscope]'" in out


def test_modelscope_hint_keeps_its_brackets(monkeypatch, capsys):
    import importlib.util

    if importlib.util.find_spec("modelscope") is not None:
        return  # the hint only shows where modelscope is missing
    code, _, err = run(monkeypatch, capsys, "infer", "--model", "ms:org/name")
    assert code == 2 and "pip install 'vitport[modelscope]'" in err


def test_infer_out_never_replaces_a_file_vitport_did_not_write(
    monkeypatch, capsys, tiny_dir, tmp_path
):
    model = str(tiny_dir("dinov2"))
    theirs = tmp_path / "model.safetensors"
    theirs.write_bytes(b"someone's weights")
    code, _, err = run(monkeypatch, capsys, "infer", "--model", model, "--out", str(theirs))
    assert code == 2 and "was not written by vitport" in err and "--overwrite" in err
    assert theirs.read_bytes() == b"someone's weights"
    ours = tmp_path / "golden.safetensors"
    code, _, err = run(monkeypatch, capsys, "infer", "--model", model, "--out", str(ours))
    assert code == 0, err
    code, _, err = run(monkeypatch, capsys, "infer", "--model", model, "--out", str(ours))
    assert code == 2 and "already holds vitport's output" in err  # its own file, kept too
    code, _, err = run(
        monkeypatch, capsys, "infer", "--model", model, "--out", str(theirs), "--overwrite"
    )
    assert code == 0, err


def test_report_out_never_replaces_a_users_readme(monkeypatch, capsys, tiny_dir, tmp_path):
    (tmp_path / "README.md").write_text("my project")
    code, _, err = run(
        monkeypatch, capsys, "report", "--model", str(tiny_dir("vit")), "--out", str(tmp_path)
    )
    assert code == 2 and "did not write" in err
    assert (tmp_path / "README.md").read_text() == "my project"


def test_outputs_are_checked_before_the_model_loads(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for args in (
        ["compare", "--json", str(blocker / "c.json")],
        ["bench", "--csv", str(blocker / "b.csv")],
        ["bench", "--markdown", str(blocker / "b.md")],
        ["infer", "--out", str(blocker / "g.safetensors")],
    ):
        # the model does not exist: a check after loading would say so instead
        code, out, err = run(monkeypatch, capsys, args[0], "--model", "./no-such-model", *args[1:])
        assert code == 2 and "cannot write" in err and "PASS" not in out, (args, err)


@pytest.mark.slow
def test_a_damaged_demo_cache_is_rebuilt_not_loaded(demo_encoder, tmp_path, monkeypatch):
    import shutil

    from vitport.families import resolve

    # a copy of the run's cache, so no other test (or xdist worker) reads the damaged file
    shutil.copytree(resolve("demo:dinov2-small")[1], tmp_path / "demo" / "dinov2-small")
    monkeypatch.setenv("VITPORT_CACHE", str(tmp_path))
    weights = resolve("demo:dinov2-small")[1] / "model.safetensors"
    assert weights.is_relative_to(tmp_path)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # cut short, as a full disk or an --out would
    import vitport

    again = vitport.load("demo:dinov2-small")
    assert again.weights_sha256 == demo_encoder.weights_sha256
    assert weights.stat().st_size == len(data)


def test_golden_files_match_images_by_content(monkeypatch, capsys, tiny_dir, tmp_path):
    from vitport.inputs import sample_images

    model = str(tiny_dir("dinov2"))
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    photos = sample_images(3)
    for i, im in enumerate(photos):
        im.image.save(first / f"{i}.png")
        im.image.save(second / f"copy-{2 - i}.png")  # other names, other order
    golden = tmp_path / "g.safetensors"
    monkeypatch.chdir(first)
    code, _, err = run(
        monkeypatch,
        capsys,
        "infer",
        "--model",
        model,
        "--out",
        str(golden),
        "0.png",
        "1.png",
        "2.png",
    )
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, out, err = run(
        monkeypatch,
        capsys,
        "compare",
        "--model",
        model,
        "--device",
        "cpu",
        "--reference",
        str(golden),
        str(second),
    )
    assert code == 0 and "PASS" in out, err
    photos[0].image.transpose(0).save(first / "0.png")  # same name, other pixels
    monkeypatch.chdir(first)
    code, out, err = run(
        monkeypatch,
        capsys,
        "compare",
        "--model",
        model,
        "--device",
        "cpu",
        "--reference",
        str(golden),
        "0.png",
        "1.png",
        "2.png",
    )
    assert code == 2 and "image 0.png is not the one" in err


def test_weights_cut_short_are_one_line_naming_the_file(monkeypatch, capsys, tiny_dir, tmp_path):
    import shutil

    from test_convert import timm_dir

    timm_model = timm_dir(
        tmp_path / "timm-source",
        "vit_base_patch16_224",
        embed_dim=32,
        depth=1,
        num_heads=2,
        img_size=32,
        patch_size=16,
    )
    for name, source in (("hf", tiny_dir("dinov2")), ("timm", timm_model)):
        model = tmp_path / name
        shutil.copytree(source, model)
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        code, _, err = run(monkeypatch, capsys, "infer", "--model", str(model))
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1, err
        assert (
            str(weights) in errors[0]
            and "damaged" in errors[0]
            and "download it again" in errors[0]
        )


def peak_rss_mb(args: list[str]) -> float:
    """Peak resident memory of one `vitport` process, in MB."""
    import os
    import subprocess
    import sys

    import vitport

    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
        "capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(vitport.__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", wrapper, sys.executable, "-m", "vitport", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return int(out.stdout.strip()) / 1024


@pytest.mark.slow
def test_infer_memory_is_flat_in_the_number_of_images(tiny_dir, tmp_path):
    import os

    from PIL import Image

    photo = tmp_path / "photo.jpg"
    Image.effect_noise((1000, 1000), 60).convert("RGB").save(photo, quality=90)  # 3 MB decoded
    for count in (20, 120):
        folder = tmp_path / f"n{count}"
        folder.mkdir()
        for i in range(count):
            os.link(photo, folder / f"{i:03d}.jpg")
    args = [
        "infer",
        "--model",
        str(tiny_dir("dinov2")),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--batch-size",
        "8",
    ]
    few = peak_rss_mb([*args, str(tmp_path / "n20")])
    many = peak_rss_mb([*args, str(tmp_path / "n120")])
    # decoding all 120 first would hold 360 MB of pixels; streaming holds one batch
    assert many < few + 150, (few, many)


def test_quiet_version_debug_after_the_command_and_strict(monkeypatch, capsys, tiny_dir, tmp_path):
    from vitport import __version__
    from vitport.inputs import sample_images

    code, out, _ = run(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"vitport {__version__}"
    code, _, err = run(monkeypatch, capsys, "infer", "--model", "./nope", "--debug")
    assert code == 2 and "Traceback" in err  # --debug after the command: the traceback too
    photo = tmp_path / "ok.jpg"
    sample_images(1)[0].image.save(photo)
    model = str(tiny_dir("dinov2"))
    code, out, err = run(
        monkeypatch,
        capsys,
        "--quiet",
        "infer",
        "--model",
        model,
        str(photo),
        str(tmp_path / "typo.jpg"),
    )
    assert code == 0 and "1 image encoded, 1 skipped (missing 1)" in out
    assert "img/s" not in err  # no progress bar
    code, _, _ = run(
        monkeypatch,
        capsys,
        "infer",
        "--model",
        model,
        "--strict",
        str(photo),
        str(tmp_path / "typo.jpg"),
    )
    assert code == 1


def test_tables_fit_80_columns_without_cutting_a_number(monkeypatch, capsys, tiny_dir):
    import contextlib
    import sys

    from vitport.cli import main

    def narrow(*args: str) -> str:
        monkeypatch.setattr(sys, "argv", ["vitport", *args])
        monkeypatch.setenv("COLUMNS", "80")
        with contextlib.suppress(SystemExit):
            main()
        return capsys.readouterr().out

    model = str(tiny_dir("dinov2"))
    bench = narrow(
        "bench",
        "--model",
        model,
        "--device",
        "cpu",
        "--batch-sizes",
        "1,2",
        "--min-seconds",
        "0.1",
        "--warmup-seconds",
        "0.05",
    )
    compare = narrow("compare", "--model", model, "--device", "cpu", "--dtype", "bf16")
    for text in (bench, compare):
        assert "…" not in text
        table_lines = [line for line in text.splitlines() if set(line) & set("│┃┏┗└┡")]
        assert table_lines and max(len(line) for line in table_lines) <= 80
    assert "not shown at this width" in bench and "img/s" in bench and "p50" in bench
    wide = narrow(
        "--wide",
        "bench",
        "--model",
        model,
        "--device",
        "cpu",
        "--batch-sizes",
        "1",
        "--min-seconds",
        "0.1",
        "--warmup-seconds",
        "0.05",
    )
    assert "not shown" not in wide and "vendor" in wide


def test_small_ones(monkeypatch, capsys, tiny_dir, tmp_path):
    import os

    model = str(tiny_dir("dinov2"))  # patch 14
    code, _, err = run(monkeypatch, capsys, "infer", "--model", model, "--image-size", "7")
    assert code == 2 and "try 14" in err and "try 0" not in err
    code, _, err = run(monkeypatch, capsys, "infer", "--model", str(tmp_path / "weights" / "x"))
    assert code == 2 and "not found" in err and "hub" not in err.split("(")[0]
    (tmp_path / "weights").mkdir()
    code, _, err = run(monkeypatch, capsys, "infer", "--model", str(tmp_path / "weights" / "x"))
    assert code == 2 and "directory" in err and "not found" in err
    for limit in ("rel_error=-1", "cos_worst=2", "logits.top1=1"):
        code, _, err = run(monkeypatch, capsys, "compare", "--model", model, "-t", limit)
        assert code == 2 and "can never pass" in err, (limit, err)
    code, _, err = run(
        monkeypatch,
        capsys,
        "compare",
        "--model",
        model,
        "--device",
        "cpu",
        "-t",
        "logits.rel_error=0.5",
    )
    assert code == 0 and "has no logits output" in err
    golden = tmp_path / "g.safetensors"
    assert run(monkeypatch, capsys, "infer", "--model", model, "--out", str(golden))[0] == 0
    mask = os.umask(0o022)
    os.umask(mask)
    assert golden.stat().st_mode & 0o777 == 0o666 & ~mask


def test_nan_in_the_features_is_warned_about(monkeypatch, capsys, tiny_dir):
    import torch

    from vitport.encoder import Encoder

    real = Encoder.encode

    def poisoned(self, pixels, names=()):
        feats = real(self, pixels, names)
        feats.pooled = torch.full_like(feats.pooled, float("nan"))
        return feats

    monkeypatch.setattr(Encoder, "encode", poisoned)
    code, out, _ = run(monkeypatch, capsys, "infer", "--model", str(tiny_dir("dinov2")))
    assert code == 0 and "pooled output holds NaN or inf" in out


def test_nonfinite_groups_names_the_outputs_with_nan_or_inf():
    import torch

    from vitport import Features

    feats = Features(
        patches=torch.zeros(2, 4, 8),
        grid=(2, 2),
        pooled=torch.zeros(2, 8),
        cls=torch.tensor([[0.0, float("inf")], [1.0, 2.0]]),
    )
    assert feats.nonfinite_groups() == ["cls"]
    feats.patches[1, 0, 0] = float("nan")
    assert set(feats.nonfinite_groups()) == {"cls", "patches"}


def test_help_reflows(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(monkeypatch, capsys, "compare", "--help")
    assert (
        "relative error (the mean absolute difference over the mean absolute reference value), "
        "vector relative error" in " ".join(out.split())
    )
    assert "(seed 000)" not in out  # a newcomer cannot decode it


def test_a_hub_id_is_not_taken_for_a_local_path_beside_its_org_folder(monkeypatch, tmp_path):
    from vitport.families import resolve

    (tmp_path / "facebook").mkdir()  # e.g. left by an earlier download to a local dir
    monkeypatch.chdir(tmp_path)
    called = []
    monkeypatch.setattr(
        "vitport.families.sources.hub_snapshot", lambda repo, hub=None: called.append(repo)
    )
    resolve("facebook/dinov2-base")
    assert called == ["facebook/dinov2-base"]


def test_version_answers_without_importing_torch():
    import re
    import subprocess
    import sys

    from vitport import __version__

    got = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "vitport", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert got.returncode == 0 and got.stdout.strip() == f"vitport {__version__}"
    imported = re.findall(r"\|\s*([\w.]+)\s*$", got.stderr, re.M)
    assert "vitport.cli" in imported and "torch" not in imported


def test_models_lists_the_families_without_importing_torch():
    """`vitport models` reads each family's model types from its own module, and those modules
    import torch, transformers and timm only when a model is loaded or built."""
    import json
    import re
    import subprocess
    import sys

    from vitport.families.base import MODULES, families

    # `python -m vitport models`, then the modules it imported (-X importtime misses the family
    # modules, which the registry imports through importlib)
    script = (
        "import atexit, json, runpy, sys\n"
        "atexit.register(lambda: print(json.dumps(sorted(sys.modules)), file=sys.stderr))\n"
        "sys.argv = ['vitport', 'models']\n"
        "runpy.run_module('vitport', run_name='__main__')\n"
    )
    got = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert got.returncode == 0, got.stderr[-2000:]
    imported = set(json.loads(got.stderr.strip().splitlines()[-1]))
    assert {f"vitport.families.{name}" for name in MODULES} <= imported
    assert not {"torch", "transformers", "timm"} & imported
    types = [t for family in families() for t in family.model_types]
    assert types and all(re.search(rf"\b{t}\b", got.stdout) for t in types)


def test_the_models_table_never_breaks_a_spec(monkeypatch, capsys):
    import sys

    from vitport.cli import main
    from vitport.families import SOURCES

    specs = [s.example for s in SOURCES]
    assert max(map(len, specs)) > 40  # the timm spec, wider than half of 80 columns
    for columns in ("80", "70"):
        monkeypatch.setattr(sys, "argv", ["vitport", "models"])
        monkeypatch.setenv("COLUMNS", columns)
        main()
        out = capsys.readouterr().out
        for spec in specs:
            assert spec in out, (columns, spec)


def test_counts_have_the_right_number():
    from vitport.format import count

    assert count(1, "image") == "1 image"
    assert count(0, "image") == "0 images"
    assert count(2, "input was", "inputs were") == "2 inputs were"
