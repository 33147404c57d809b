"""The vitport command as a user runs it: output, saved features, one-line errors, exit codes."""

from __future__ import annotations

import sys

import numpy as np
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
        monkeypatch,
        capsys,
        "infer",
        "--model",
        str(tiny_dir("dinov2_with_registers")),
        str(good),
        str(bad),
        "--out",
        str(out_file),
    )
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


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_and_keeps_the_exit_code(monkeypatch, capsys, where):
    command = ["infer", "--model", "demo:dinov2-smal"]
    args = ["--debug", *command] if where == "before" else [*command, "--debug"]
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 2  # a usage error stays one, with or without --debug
    assert "Traceback" in err and "SpecError" in err
    assert (
        err.strip().splitlines()[-1]
        == "error: unknown demo model 'dinov2-smal'; known demos: dinov2-small"
    )

    def broken(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr("vitport.device.available_devices", broken)  # an unexpected error: 1
    code, _, err = run(monkeypatch, capsys, "devices", "--debug")
    assert code == 1 and "Traceback" in err and "RuntimeError: a bug" in err


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
    code, _, err = run(
        monkeypatch,
        capsys,
        "bench",
        "--model",
        str(tiny_dir("vit")),
        "--device",
        "cpu",
        "--batch-sizes",
        "1",
        "--min-seconds",
        "0.05",
        "--warmup-seconds",
        "0",
        "--json",
        str(baseline),
    )
    assert code == 0, err
    assert json.loads(baseline.read_text())["dtype"] == "fp32"
    code, _, err = run(
        monkeypatch,
        capsys,
        "bench",
        "--model",
        str(tiny_dir("vit")),
        "--dtype",
        "bf16",
        "--baseline",
        str(baseline),
    )
    assert code == 2 and "compare like with like" in err


def test_out_must_be_a_file(monkeypatch, capsys, tmp_path, tiny_dir):
    code, _, err = run(
        monkeypatch, capsys, "infer", "--model", str(tiny_dir("vit")), "--out", str(tmp_path)
    )
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
    code, _, err = run(
        monkeypatch, capsys, "bench", "--model", "demo:dinov2-small", "--json", str(foreign)
    )
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
    code, _, err = run(
        monkeypatch, capsys, "embed", str(image), "--model", "demo:dinov2-small", "--out", str(out)
    )
    assert "holds files vitport did not write" in one_line_refusal(code, err)
    code, _, err = run(
        monkeypatch,
        capsys,
        "embed",
        str(not_images),
        "--model",
        "demo:dinov2-small",
        "--out",
        str(tmp_path / "new"),
    )
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
    code, out, err = run(monkeypatch, capsys, "infer", "--model", str(tiny_dir("vit")), str(photos))
    assert code == 0, err
    assert f"skipped {photos / 'ok'}: not an image" in err
    assert "1 image encoded, 1 skipped (not-an-image 1): listed above" in " ".join(out.split())
    code, _, _ = run(
        monkeypatch, capsys, "infer", "--model", str(tiny_dir("vit")), "--strict", str(photos)
    )
    assert code == 1


def test_compare_counts_skipped_inputs(monkeypatch, capsys, tiny_dir, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for colour in ("red", "blue"):
        Image.new("RGB", (40, 30), colour).save(photos / f"{colour}.png")
    (photos / "notes.txt").write_text("text")
    code, out, err = run(
        monkeypatch, capsys, "compare", "--model", str(tiny_dir("vit")), str(photos)
    )
    assert code == 0, err
    assert "notes.txt: not an image" in err
    assert "2 inputs compared, 1 skipped (not-an-image 1): listed above" in " ".join(out.split())


# ------------------------------------------------------- infer's latency column


def test_infer_latency_column_and_footer_say_what_they_are(monkeypatch, capsys, tiny_dir, tmp_path):
    for colour in ("red", "blue"):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{colour}.png")
    images = [str(tmp_path / "red.png"), str(tmp_path / "blue.png")]
    model = str(tiny_dir("vit"))
    code, out, err = run(
        monkeypatch, capsys, "infer", "--model", model, "--batch-size", "2", *images
    )
    assert code == 0, err
    text = " ".join(out.split())
    assert "ms/image (batch ÷ n)" in text
    assert "divided by its n images; the first call, a batch of 2, took" in text
    code, out, err = run(monkeypatch, capsys, "infer", "--model", model, *images)
    text = " ".join(out.split())
    assert "ms/image" in text and "batch ÷ n" not in text
    assert "the first call (" in text and "includes warm-up" in text


def _empty_results() -> dict[str, tuple]:
    """For each table builder, arguments that give it no data rows."""
    from types import SimpleNamespace as NS

    from vitport.embed.dedup import Pairs

    side = NS(device="cpu", dtype="fp32", fixes=[], kind="device", path=None, runtime="torch")
    compare = NS(
        spec="demo:x",
        candidate=side,
        reference=side,
        inputs=[],
        groups={},
        floor={},
        floor_ratio={},
        passed=True,
        worst_rel_error=0.0,
        trials=[],
        localization=NS(points=[], blocks=lambda: [], culprit=None),
        localization_reference="cpu fp32",
    )
    bench = NS(
        spec="demo:x",
        device="cpu",
        dtype="fp32",
        attention="sdpa",
        compiled=False,
        runtime="torch",
        image_size=(224, 224),
        best=lambda: None,
        rows=lambda: [],
        batch_sizes=[],
        trials=[],
        images=0,
        batch_size=1,
        workers=0,
        images_per_second=0.0,
        breakdown=lambda: {},
    )
    features = NS(meta={"dtype": "fp32"}, shapes=lambda: {}, names=[], pooled=[])
    return {
        "accuracy_table": (compare,),
        "per_input_table": (compare,),
        "localization_table": (compare,),
        "trials_table": (compare,),
        "conversion_table": (NS(inputs=[], image_size=224, checks=[]),),
        "shapes_table": ("demo:x", NS(image_size=(224, 224), device="cpu"), features),
        "per_image_table": (
            NS(features=features, original_sizes=[], per_image_ms=[], batch_sizes=[]),
        ),
        "fixes_table": ([],),
        "thresholds_table": ("fp32", []),
        "sources_table": ([],),
        "device_table": ({},),
        "pairs_table": (Pairs([], [], np.zeros(0), "torch", 0.95, 6), 20),
        "bench_table": (bench,),
        "optimize_table": (bench,),
        "e2e_table": (bench,),
    }


def test_every_table_renders_with_no_rows(monkeypatch, capsys):
    """Each table builder, given nothing to list, renders narrow, fitted and --wide."""
    import inspect

    from rich.table import Table

    from vitport.cli import bench_tables, infer_tables, tables
    from vitport.cli.app import STATE
    from vitport.cli.display import show
    from vitport.cli.fit import fit

    builders = {
        name: fn
        for module in (tables, bench_tables, infer_tables)
        for name, fn in inspect.getmembers(module, inspect.isfunction)
        if fn.__module__ == module.__name__ and "Table" in str(fn.__annotations__.get("return"))
    }
    arguments = _empty_results()
    assert set(builders) == set(arguments)  # a new builder needs its empty case here
    monkeypatch.setenv("COLUMNS", "30")
    for name, build in builders.items():
        table = build(*arguments[name])
        assert isinstance(table, Table)
        headers = tuple(str(c.header) for c in table.columns)
        for wide in (False, True):
            monkeypatch.setitem(STATE, "wide", wide)
            show(table, drop_order=headers)
        show(fit(table, 20, headers))
        assert capsys.readouterr().out, name


def test_dedup_with_no_pairs_says_so(monkeypatch, capsys, tmp_path):
    from vitport.embed import dedup
    from vitport.embed.dedup import Pairs

    pairs = Pairs([], [], np.zeros(0, np.float32), "torch", 0.95, 6)
    monkeypatch.setattr(dedup, "near_duplicates", lambda *_: pairs)
    for extra in ([], ["--show", "0"], ["--threshold", "0.5"]):
        for wide in ([], ["--wide"]):
            code, out, err = run(monkeypatch, capsys, *wide, "dedup", str(tmp_path), *extra)
            assert code == 0, err
            assert out.strip() == "0 pairs with cosine ≥ 0.95 among 6 embeddings"
    pairs = Pairs(["a.jpg"], ["b.jpg"], np.ones(1, np.float32), "torch", 0.9, 2)
    monkeypatch.setattr(dedup, "near_duplicates", lambda *_: pairs)
    code, out, _ = run(monkeypatch, capsys, "--wide", "dedup", str(tmp_path), "--show", "0")
    assert code == 0 and out.strip() == "1 pair with cosine ≥ 0.9 among 2 embeddings"
    code, out, _ = run(monkeypatch, capsys, "dedup", str(tmp_path))
    assert code == 0 and "a.jpg" in out and "1.0000" in out


def _source_help(command: str | None) -> list[str]:
    """The help texts as written in the source: a command's docstring and its options' help
    (command None: the app's own)."""
    import inspect

    from vitport.cli import app

    if command is None:
        callback, texts = app.registered_callback.callback, [app.info.help]
    else:
        info = next(c for c in app.registered_commands if c.callback.__name__ == command)
        callback, texts = info.callback, [inspect.getdoc(info.callback)]
    for parameter in inspect.signature(callback, eval_str=True).parameters.values():
        for meta in getattr(parameter.annotation, "__metadata__", ()):
            texts.append(getattr(meta, "help", None) or "")
    return texts


def _help_at_100(monkeypatch, capsys, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", ["vitport", *args, "--help"])
    monkeypatch.setenv("COLUMNS", "100")
    try:
        main()
    except SystemExit as stop:
        assert stop.code in (0, None)
    return capsys.readouterr().out


def test_help_keeps_every_bracketed_word_and_flags_show_no_type(monkeypatch, capsys):
    import re

    from vitport.cli import app

    commands = [None, *(c.callback.__name__ for c in app.registered_commands)]
    checked = set()
    for command in commands:
        text = _help_at_100(monkeypatch, capsys, *([command] if command else []))
        assert "<bool>" not in text, command  # flags take no value, so help shows none
        for source in _source_help(command):
            for word in re.findall(r"\[[^\]\s]+\]", source):
                assert word in text, (command, word)
                checked.add(word)
    assert "[ray]" in checked  # embed --engine's 'vitport[ray]'
    infer = _help_at_100(monkeypatch, capsys, "infer")
    assert "<str>" in infer and "<int range>" in infer  # options that take a value keep theirs


@pytest.mark.parametrize("value", ["true", "FALSE", "yes", "No", "1", "0", "on"])
def test_a_value_after_a_flag_is_refused(monkeypatch, capsys, value):
    code, out, err = run(monkeypatch, capsys, "infer", "--model", "X", "--strict", value, "a.jpg")
    assert code == 2 and not out
    assert err.strip() == f"error: --strict is a flag and takes no value: drop '{value}'"
    code, _, err = run(monkeypatch, capsys, "--quiet", value, "infer", "--model", "X")
    assert (
        code == 2 and err.strip() == f"error: --quiet is a flag and takes no value: drop '{value}'"
    )


def test_a_file_named_like_a_value_after_a_flag_is_an_input(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "true").write_bytes(b"")
    code, _, err = run(monkeypatch, capsys, "infer", "--model", "nonsense spec", "--strict", "true")
    assert code == 2 and "is a flag" not in err and "cannot understand model spec" in err


@pytest.mark.parametrize("command", ["infer", "compare", "bench", "report", "embed"])
def test_every_model_help_names_every_spec_and_dtype(monkeypatch, capsys, command):
    code, out, _ = run(monkeypatch, capsys, command, "--help")
    assert code == 0
    for spec in ("demo:NAME", "hf:ORG/NAME", "ms:ORG/NAME", "atomgit:ORG/NAME", "timm:NAME"):
        assert spec in out, spec
    words = " ".join(out.replace("│", " ").split())
    assert "fp32, fp16, bf16, or fp64" in words


def test_top_level_help_says_where_debug_goes_and_names_atomgit(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "--help")
    words = " ".join(out.replace("│", " ").split())
    assert code == 0 and "atomgit:ORG/NAME" in words
    assert "--debug, before or after the command" in words


def test_errors_list_what_the_help_lists(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "infer", "--model", "not a spec!")
    assert code == 2 and "atomgit:ORG/NAME" in err
    code, _, err = run(
        monkeypatch, capsys, "infer", "--model", "demo:dinov2-small", "--dtype", "int8"
    )
    assert code == 2
    listed = err.split("use one of ")[1].split(" (")[0].split(", ")
    assert listed == ["fp32", "fp16", "bf16", "fp64"]  # each one named in --dtype's help


@pytest.mark.parametrize("command", ["infer", "compare", "bench", "report", "convert", "embed"])
def test_every_command_that_loads_a_model_takes_the_model_options(command):
    """The shared model options, through the same aliases, on every command that loads one."""
    import typer

    from vitport.cli import app

    group = typer.main.get_command(app)
    options = {opt for param in group.commands[command].params for opt in param.opts}
    assert {"--weights", "--trust-remote-code", "--image-size"} <= options
