"""report --package: the port as a model repository, every file of it, and how it is written."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors import safe_open

import vitport
from vitport.golden import GoldenBlocks
from vitport.port.manifest import GOLDEN, MANIFEST, WEIGHTS, read_manifest
from vitport.port.package import (
    BLOCK_IMAGES,
    PIPELINE_TAG,
    REQUIREMENTS,
    hub_id,
    write_card,
    write_package,
)
from vitport.port.standalone import SCRIPT, inference_script

QUICK = ("--batch-sizes", "1", "--min-seconds", "0.05")
REPORT_FILES = {"README.md", "report.json", "inference.json", "bench.json", "compare.json"}
WEIGHT_FILES = {WEIGHTS, "config.json", "preprocessor_config.json"}


def run_cli(*args: str) -> tuple[int, str]:
    from vitport.cli import main

    out = io.StringIO()
    redirect = contextlib.redirect_stdout(out), contextlib.redirect_stderr(out)
    with pytest.MonkeyPatch.context() as mp, redirect[0], redirect[1]:
        mp.setattr(sys, "argv", ["vitport", *args])
        mp.setenv("COLUMNS", "200")
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    return code, out.getvalue()


@pytest.fixture(scope="module")
def source(tiny_dir, tmp_path_factory) -> Path:
    """A tiny DINOv2 whose model card declares its license, as a hub repository's does."""
    path = tmp_path_factory.mktemp("licensed") / "dinov2"
    shutil.copytree(tiny_dir("dinov2"), path)
    ModelCard(f"---\n{ModelCardData(license='Apache-2.0').to_yaml()}\n---\n# tiny\n").save(
        path / "README.md"
    )
    return path


@pytest.fixture(scope="module")
def port(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ports") / "port"
    args = ("report", "--model", str(source), "--device", "cpu", "--dtype", "bf16", *QUICK)
    code, text = run_cli(*args, "--out", str(out), "--package")
    assert code == 0, text
    assert "port packaged with its weights" in text
    return out


@pytest.fixture(scope="module")
def run(source):
    """A report's run of the same model, made through the library with a tiny window."""
    from vitport.bench.run import Window
    from vitport.inputs import sample_images
    from vitport.report import ReportOptions, run_report

    window = Window(warmup_iters=1, warmup_seconds=0.0, min_iters=1, min_seconds=0.0)
    options = ReportOptions(str(source), "cpu", "bf16", batch_sizes=(1,), window=window)
    return run_report(options, sample_images(2))


def test_the_package_holds_every_file(port):
    names = {p.name for p in port.iterdir()}
    assert REPORT_FILES | WEIGHT_FILES | {MANIFEST, GOLDEN, REQUIREMENTS, SCRIPT} <= names
    assert not any(n.startswith(".") for n in names)  # nothing of the temporary build is left
    assert all((port / n).stat().st_size > 0 for n in names)
    assert (port / WEIGHTS).stat().st_mode & 0o044  # readable by others, as a repository's file


def test_the_card_carries_its_metadata_and_the_report(port):
    card = ModelCard.load(port / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == PIPELINE_TAG == "image-feature-extraction"
    assert set(data["tags"]) == {"cpu", "dinov2", "vitport"}
    assert data["license"] == "apache-2.0"  # the source's card, as the hub spells identifiers
    assert "base_model" not in data  # a local directory has no hub id
    assert "## 7. Accuracy" in card.text and "**Faithful**" in card.text
    assert "FAILS" not in card.text


def test_the_manifest_records_the_run(port, source):
    manifest = read_manifest(port)
    report = json.loads((port / "report.json").read_text())
    loaded = vitport.load(str(source))
    assert manifest.source == str(source) and manifest.weights_included
    assert manifest.weights_sha256 == loaded.weights_sha256
    assert (manifest.device_type, manifest.dtype, manifest.fixes) == ("cpu", "bf16", ())
    assert (manifest.runtime, manifest.attention) == ("torch", "default")
    assert manifest.passed and manifest.verdict["checks"] == report["compare"]["verdict"]["checks"]
    assert list(manifest.limits) == report["compare"]["thresholds"]
    assert list(manifest.image_size) == report["model"]["image_size"]
    assert manifest.environment["torch"] == torch.__version__
    assert manifest.vitport_version == vitport.__version__ and manifest.created
    assert manifest.reference == {"kind": "run", "device": "cpu", "dtype": "fp32"}
    assert manifest.lang == "en"


def test_the_golden_file_is_the_reference_with_small_block_states(port):
    manifest = read_manifest(port)
    report = json.loads((port / "report.json").read_text())
    golden = vitport.Features.load(port / GOLDEN)
    assert golden.names == report["compare"]["inputs"]  # the report's own inputs
    assert golden.meta["dtype"] == "fp32" and golden.meta["device"] == "cpu"
    assert list(manifest.inputs_sha256) == golden.meta["image_sha256"]
    assert len(set(manifest.inputs_sha256)) == len(golden.names)
    blocks = GoldenBlocks.open(port / GOLDEN)
    assert blocks is not None and blocks.dtype == "fp16"
    assert blocks.images == golden.names[:BLOCK_IMAGES]
    with safe_open(str(port / GOLDEN), framework="pt") as f:
        states = [f.get_tensor(k) for k in f.keys() if k.startswith("blocks/")]  # noqa: SIM118
    assert states and all(t.dtype == torch.float16 and len(t) == BLOCK_IMAGES for t in states)
    state_bytes = sum(t.numel() * 2 for t in states)
    assert (port / GOLDEN).stat().st_size < 2 * state_bytes + 200_000


def test_the_port_loads_back_to_the_same_weights(port):
    manifest = read_manifest(port)
    assert vitport.load(str(port)).weights_sha256 == manifest.weights_sha256


def test_the_standalone_script_is_the_ports_own(port, source):
    """inference.py is standalone's script for this port (test_standalone runs such scripts)."""
    script = (port / SCRIPT).read_text()
    assert script == inference_script(vitport.load(str(source)), read_manifest(port))
    compile(script, SCRIPT, "exec")


def test_compare_takes_the_golden_file_and_localises_from_it(port):
    golden = str(port / GOLDEN)
    args = ("--model", str(port), "--device", "cpu", "--dtype", "bf16", "--reference", golden)
    code, text = run_cli("compare", *args, "--localize")
    assert code == 0, text
    assert "golden file's block states" in text and "(fp16, 4 images)" in text
    assert "block 1" in text and "PASS" in text


def test_requirements_pin_the_versions_that_ran(port):
    pins = dict(line.split("==") for line in (port / REQUIREMENTS).read_text().split())
    assert pins["torch"] == torch.__version__.split("+")[0]
    assert {"torch", "transformers", "safetensors", "pillow", "numpy"} == set(pins)


def test_an_npu_port_requires_torch_npu(port, monkeypatch):
    import importlib.metadata

    from vitport.port.package import requirements

    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda n: "2.5.1.post2" if n == "torch_npu" else real(n)
    )
    npu = replace(read_manifest(port), device_type="npu")
    assert "torch_npu==2.5.1.post2" in requirements(npu).split()
    assert "torch_npu" not in requirements(read_manifest(port))


@pytest.fixture(scope="module")
def two_images(tmp_path_factory) -> list[str]:
    """Two photo files: a report on them is short."""
    from vitport.inputs import sample_images

    directory = tmp_path_factory.mktemp("images")
    paths = []
    for image in sample_images(2):
        paths.append(str(directory / f"{image.name.split(':')[-1]}.png"))
        image.image.save(paths[-1])
    return paths


def test_no_weights_records_the_source_and_its_sha256(source, two_images, tmp_path):
    out = tmp_path / "port"
    args = ("report", "--model", str(source), *two_images, "--device", "cpu", *QUICK)
    code, text = run_cli(*args, "--out", str(out), "--package", "--no-weights")
    assert code == 0, text
    assert "without weights" in text
    names = {p.name for p in out.iterdir()}
    assert not names & WEIGHT_FILES and {MANIFEST, GOLDEN, REQUIREMENTS, SCRIPT} <= names
    assert "no weights beside" in (out / SCRIPT).read_text()  # it asks for the source's files
    manifest = read_manifest(out)
    assert not manifest.weights_included and manifest.source == str(source)
    assert manifest.weights_sha256 == vitport.load(str(source)).weights_sha256
    assert vitport.Features.load(out / GOLDEN).names == two_images
    assert len(manifest.inputs_sha256) == 2


def test_a_failing_port_packaged_with_allow_fail_says_so(tiny_dir, two_images, tmp_path):
    """A real FAIL: a final norm scaled past fp16's range overflows an fp16 run."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "loud"
    shutil.copytree(tiny_dir("dinov2"), model)
    state = load_file(model / WEIGHTS)
    state["layernorm.weight"] *= 1e5
    save_file(state, model / WEIGHTS, metadata={"format": "pt"})
    out = tmp_path / "port"
    args = ("report", "--model", str(model), *two_images, "--device", "cpu", "--dtype", "fp16")
    code, text = run_cli(*args, *QUICK, "--out", str(out), "--package", "--allow-fail")
    assert code == 0, text
    manifest = read_manifest(out)
    assert manifest.allow_fail and not manifest.passed
    failed = {(c["group"], c["metric"]) for c in manifest.verdict["checks"] if not c["passed"]}
    assert ("patches", "nonfinite") in failed
    card = ModelCard.load(out / "README.md")
    assert "**This port FAILS its accuracy check**" in card.text
    assert "**Not faithful**" in card.text
    from vitport.port.publish import check_package

    assert check_package(out, allow_fail=True) == manifest  # publish takes it as it is


def test_flags_without_a_run_are_refused(tmp_path):
    code, text = run_cli(
        "report", "--model", "demo:x", "--out", str(tmp_path / "a"), "--no-weights"
    )
    assert code == 2 and "--no-weights applies to --package" in text
    code, text = run_cli("report", "--model", "demo:x", "--allow-fail")
    assert code == 2 and "--allow-fail applies to --package" in text
    code, text = run_cli("report", "--from", str(tmp_path / "r.json"), "--package")
    assert code == 2 and "drop --from" in text
    assert not (tmp_path / "a").exists()


def test_a_directory_with_other_files_is_refused_then_kept_with_overwrite(run, tmp_path):
    from vitport.outputs import OutputError

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="overwrite=True"):
        write_package(run, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    write_package(run, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and read_manifest(out) is not None
    write_package(run, tmp_path / "ported")
    with pytest.raises(OutputError, match="already holds vitport's output"):
        write_package(run, tmp_path / "ported")  # a port is replaced only with overwrite=True


def test_a_failure_leaves_nothing_half_written(run, port, tmp_path, monkeypatch):
    import vitport.port.package as package

    before = {p.name: p.read_bytes() for p in port.iterdir()}

    def broken(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(package, "write_golden", broken)
    from vitport.outputs import OutputError

    with pytest.raises(OutputError, match="No space left"):
        write_package(run, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError):
        write_package(run, port, overwrite=True)  # a port already there stays as it was
    assert {p.name: p.read_bytes() for p in port.iterdir()} == before


def test_a_fail_packaged_anyway_says_so_in_both_languages(port, tmp_path):
    shutil.copytree(port, tmp_path / "p")
    manifest = read_manifest(port)
    failed = replace(manifest, verdict={**manifest.verdict, "passed": False})
    assert "FAILS" not in write_card(tmp_path / "p", failed).text
    card = write_card(tmp_path / "p", replace(failed, allow_fail=True))
    assert "**This port FAILS its accuracy check**" in card.text
    assert card.data.license == "apache-2.0"  # the earlier card's, kept
    zh = write_card(tmp_path / "p", replace(failed, allow_fail=True, lang="zh"))
    assert "本移植未通过精度校验" in zh.text and "精度评测" in zh.text


def test_hub_ids_for_base_model():
    assert hub_id("hf:facebook/dinov2-small") == "facebook/dinov2-small"
    assert hub_id("facebook/dinov2-small") == "facebook/dinov2-small"
    assert (
        hub_id("timm:vit_small_patch14_dinov2.lvd142m") == "timm/vit_small_patch14_dinov2.lvd142m"
    )
    assert hub_id("demo:dinov2-small") is None
    assert hub_id("ms:facebook/dinov2-small") is None


def test_a_hub_sources_license_comes_from_its_model_card(source, tiny_dir, tmp_path, monkeypatch):
    """The weights' download leaves the README out: the license is read from the hub's card,
    and where there is none, none is written."""
    import huggingface_hub.constants as constants
    from hubstub import StubHub

    from vitport.port.package import source_license

    loaded = vitport.load(str(tiny_dir("dinov2")))  # its directory declares no license
    with StubHub() as stub:
        stub.add("org/licensed", source)
        stub.add("org/plain", tiny_dir("dinov2"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_ENDPOINT", stub.url)
        assert source_license("hf:org/licensed", loaded) == "Apache-2.0"
        assert source_license("org/licensed", loaded) == "Apache-2.0"
        assert source_license("hf:org/plain", loaded) is None
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert source_license("hf:org/licensed", loaded) is None  # unreachable, not cached: unknown


def test_a_golden_file_reference_is_the_ports_golden_file(source, tmp_path):
    """Against a golden file from another machine, that file is the port's reference as it is."""
    from vitport.bench.run import Window
    from vitport.compare.check import load_golden
    from vitport.inputs import sample_images
    from vitport.port.package import record_golden
    from vitport.report import ReportOptions, run_report

    written = tmp_path / "other-machine.safetensors"
    record_golden(vitport.load(str(source)), sample_images(2), written)
    window = Window(warmup_iters=1, warmup_seconds=0.0, min_iters=1, min_seconds=0.0)
    options = ReportOptions(str(source), "cpu", "bf16", batch_sizes=(1,), window=window)
    run = run_report(options, golden=load_golden(written))
    package = write_package(run, tmp_path / "port")
    assert (package.directory / GOLDEN).read_bytes() == written.read_bytes()
    assert package.manifest.reference["kind"] == "golden"
    assert list(package.manifest.inputs_sha256) == load_golden(written).meta["image_sha256"]


def test_an_msprobe_dump_reference_is_refused_before_the_run(source, tmp_path):
    dump = tmp_path / "dump"
    code, text = run_cli("infer", "--model", str(source), "--format", "msprobe", "--out", str(dump))
    assert code == 0, text
    args = (
        "report",
        "--model",
        str(source),
        "--reference",
        str(dump),
        "--out",
        str(tmp_path / "p"),
    )
    code, text = run_cli(*args, "--package")
    assert code == 2 and "an msprobe dump cannot be one" in text and "--package" in text
    assert not (tmp_path / "p").exists()
