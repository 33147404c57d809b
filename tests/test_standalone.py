"""A packaged port's standalone inference.py, and the fix templates it is written from.

Each fix's template, applied to a tiny model, computes what vitport's fix makes it compute. The
script, run in a subprocess where vitport cannot be imported, reproduces `vitport.load` + fixes +
`infer` on real photos (cos >= 0.9999 in fp32) for every family's tiny model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from safetensors.torch import load_file
from torch import nn

import vitport
from vitport.errors import VitportError
from vitport.fixes import FIXES, apply_fixes, process_settings_restored
from vitport.infer import infer
from vitport.inputs import read_images
from vitport.port.manifest import Manifest
from vitport.port.standalone import SCRIPT, inference_script

TEMPLATE_FIXES = ("erf-gelu", "layernorm-fp32", "attention-fp32", "math-sdpa")
PORT_FIXES = ("erf-gelu", "layernorm-fp32")
MIN_COS = 0.9999


# --------------------------------------------------------------------------- the templates


@pytest.mark.parametrize("name", FIXES.names())
def test_every_registered_fix_has_a_template_that_compiles(name):
    template = FIXES.get(name).template
    assert isinstance(template, str) and template.strip(), f"fix {name} has no template"
    assert template.startswith(f"# {name}:"), "a template opens with its fix's name"
    compile(template, f"<template {name}>", "exec")
    assert "vitport" not in template


class Run(nn.Module):
    """An encoder's forward as one module, the way the script's Encoder runs it."""

    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.inner = encoder.module
        self.forward_fn = encoder.forward_fn

    def forward(self, pixels: torch.Tensor) -> Any:
        return self.forward_fn(self.inner, pixels)


def apply_template(encoder: Any, fix: str) -> Run:
    """The template of `fix` applied to a copy of `encoder`'s model, without vitport's code."""
    copy = encoder.to(copy=True)
    model = Run(copy)
    names = {id(m): n for n, m in model.named_modules()}
    norm = copy.final_norm
    namespace = {
        "torch": torch,
        "nn": nn,
        "F": F,
        "model": model,
        "blocks": list(copy.blocks),
        "final_norm": names[id(norm)] if norm is not None else "",
    }
    exec(FIXES.get(fix).template, namespace)
    return model


def approximate_gelus(encoder: Any) -> None:
    """Make every GELU in the blocks the tanh approximation, as a device's kernel may be."""
    for block in encoder.blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if "gelu" in type(child).__name__.lower():
                    setattr(parent, name, nn.GELU(approximate="tanh"))


class LowPrecisionNorm(nn.Module):
    """A LayerNorm that computes in its input's dtype, as a device's kernel may."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias = norm.weight, getattr(norm, "bias", None)
        self.eps = float(getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        out = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return out if self.bias is None else out + self.bias


def low_precision_norms(encoder: Any) -> None:
    """Make every norm in the blocks, and the final norm, compute in low precision."""
    from vitport.encoder import is_norm

    swaps = {id(m): LowPrecisionNorm(m) for b in encoder.blocks for m in b.modules() if is_norm(m)}
    if encoder.final_norm is not None:
        swaps[id(encoder.final_norm)] = LowPrecisionNorm(encoder.final_norm)
        encoder.final_norm = swaps[id(encoder.final_norm)]
    for parent in list(encoder.module.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in swaps:
                setattr(parent, name, swaps[id(child)])


# the device faults that give each fix something to change
PLANTED = {"erf-gelu": approximate_gelus, "layernorm-fp32": low_precision_norms}


def template_cases() -> list[Any]:
    """Every tiny model, fix and dtype; a fix that a planted device fault gives something to
    change runs with and without it."""
    return [
        pytest.param(model, fix, dtype, planted, id=f"{model}-{fix}-{dtype}{planted}")
        for model in TINY
        for fix in TEMPLATE_FIXES
        for dtype in ("bf16", "fp32")
        for planted in (("-planted", "") if fix in PLANTED else ("",))
    ]


@pytest.mark.parametrize(("model", "fix", "dtype", "planted"), template_cases())
def test_a_template_computes_what_its_fix_does(tiny_dir, model, fix, dtype, planted):
    encoder = vitport.load(str(tiny_dir(model)), dtype=dtype)
    if planted:
        PLANTED[fix](encoder)  # so that the fix has something to change
    fixed = encoder.to(copy=True)
    try:
        apply_fixes(fixed, [fix])
    except VitportError as exc:  # the fix does not apply to this model (nor does its template)
        pytest.skip(str(exc))
    gen = torch.Generator().manual_seed(0)
    h, w = encoder.image_size
    pixels = torch.randn(2, 3, h, w, generator=gen).to(encoder.dtype)
    with torch.inference_mode():
        want = fixed.forward_fn(fixed.module, pixels)
        got = apply_template(encoder, fix)(pixels)
        before = encoder.forward_fn(encoder.module, pixels)
    # bf16 tolerance where vitport judged a norm "already float32" from a few probe rows (CPU
    # bf16 LayerNorm): the template computes it in float32 regardless, a bf16 ulp apart at times
    loose = fix == "layernorm-fp32" and dtype == "bf16" and not planted
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if loose else {"atol": 1e-6, "rtol": 1e-5}
    torch.testing.assert_close(got.tokens, want.tokens, **tolerance)
    if want.pooled is not None:
        torch.testing.assert_close(got.pooled, want.pooled, **tolerance)
    changed = {"erf-gelu": "fp32", "layernorm-fp32": "bf16", "attention-fp32": "bf16"}
    if planted and changed.get(fix) == dtype:  # the fix changed the function; so did the template
        assert not torch.equal(before.tokens, got.tokens)
    if fix == "attention-fp32" and dtype == "bf16":
        assert not torch.equal(before.tokens, got.tokens)


def test_the_no_tf32_template_sets_what_the_fix_sets(tiny_dir):
    from vitport.device.precision import ABSENT, STRICT_SETTINGS

    present = [s for s in STRICT_SETTINGS if s.get() is not ABSENT]
    loose = {"torch.float32_matmul_precision": "high"}

    def loosen() -> None:
        for setting in present:
            setting.put(loose.get(setting.name, not setting.strict))

    def state() -> dict[str, Any]:
        return {s.name: s.get() for s in present}

    encoder = vitport.load(str(tiny_dir("dinov2")))
    with process_settings_restored():
        loosen()
        assert all(v != s.strict for s, v in zip(present, state().values(), strict=True))
        exec(FIXES.get("no-tf32").template, {"torch": torch, "model": encoder.module})
        by_template = state()
        loosen()
        apply_fixes(encoder, ["no-tf32"])
        by_fix = state()
    assert by_template == by_fix == {s.name: s.strict for s in present}


# --------------------------------------------------------------------------- the script


def write_port(encoder: Any, source: Path, directory: Path, manifest: Manifest) -> Path:
    """A port directory as `report --package` writes it: the weights as loaded with their config
    (transformers' save_pretrained, timm's through vitport's checkpoint writer), the source's
    preprocessor config, and the script."""
    from vitport.convert.layouts import (
        loaded_arch,
        loaded_preprocessing,
        loaded_state,
        write_checkpoint,
    )

    if encoder.family == "timm":
        arch, recipe = loaded_arch(encoder), loaded_preprocessing(encoder)
        write_checkpoint(directory, "timm", arch, loaded_state(encoder), recipe)
    else:
        encoder.module.save_pretrained(directory)
        processor = "preprocessor_config.json"
        (directory / processor).write_text((source / processor).read_text())
    (directory / SCRIPT).write_text(inference_script(encoder, manifest))
    return directory


def manifest_of(encoder: Any, fixes: tuple[str, ...], dtype: str = "fp32") -> Manifest:
    return Manifest(
        source=encoder.spec,
        weights_sha256=encoder.weights_sha256,
        weights_included=True,
        family=encoder.family,
        device_type="cpu",
        dtype=dtype,
        fixes=fixes,
    )


@pytest.fixture(scope="module")
def photo_files(photos, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    files = []
    for i, photo in enumerate(photos[:3]):
        path = folder / f"photo{i}.png"
        photo.image.save(path)
        files.append(path)
    return files


@pytest.fixture(scope="module")
def no_vitport(tmp_path_factory) -> dict[str, str]:
    """An environment in which `import vitport` fails: a `vitport` package first on the path
    that raises ImportError."""
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "vitport").mkdir()
    (folder / "vitport" / "__init__.py").write_text(
        'raise ImportError("vitport is made unimportable for the standalone script")\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(folder), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_script(port: Path, files: list[Path], out: Path, env: dict[str, str], *flags: str) -> str:
    command = [sys.executable, str(port / SCRIPT), *map(str, files), "--out", str(out), *flags]
    done = subprocess.run(
        command, env=env, cwd=out.parent, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_vitport_is_unimportable_where_the_script_runs(no_vitport):
    done = subprocess.run(
        [sys.executable, "-c", "import vitport"], env=no_vitport, capture_output=True, text=True
    )
    assert done.returncode != 0 and "made unimportable" in done.stderr


def applicable(encoder: Any, fixes: tuple[str, ...]) -> tuple[str, ...]:
    """The fixes that apply to this model (erf-gelu does not to a model trained without exact
    GELU)."""
    found = []
    for fix in fixes:
        try:
            apply_fixes(encoder.to(copy=True), [fix])
        except VitportError:
            continue
        found.append(fix)
    return tuple(found)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


def script_cases() -> list[Any]:
    fast = {"dinov2_with_registers"}
    return [
        pytest.param(name, marks=() if name in fast else pytest.mark.slow, id=name) for name in TINY
    ]


@pytest.mark.parametrize("name", script_cases())
def test_the_script_reproduces_vitport_without_vitport(
    name, tiny_dir, tmp_path, photo_files, no_vitport
):
    source = tiny_dir(name)
    loaded = vitport.load(str(source))
    fixes = applicable(loaded, PORT_FIXES)
    port = write_port(loaded, source, tmp_path / "port", manifest_of(loaded, fixes))

    encoder = vitport.load(str(port))
    apply_fixes(encoder, fixes)
    images, problems = read_images(photo_files)
    assert not problems
    want = infer(encoder, images).features

    out = tmp_path / "features.safetensors"
    printed = run_script(port, photo_files, out, no_vitport, "--device", "cpu", "--dtype", "fp32")
    got = load_file(str(out))

    expected = {"patches": want.patches, "pooled": want.pooled}
    if want.cls is not None:
        expected["cls"] = want.cls
    assert set(got) == set(expected)
    for group, tensor in expected.items():
        assert got[group].shape == tensor.shape, group
        assert f"{group}: {list(tensor.shape)}" in printed
        worst = cosines(got[group], tensor).min().item()
        assert worst >= MIN_COS, f"{group}: cos {worst:.6f}"


def test_the_script_keeps_the_port_dtype_and_takes_another(
    tiny_dir, tmp_path, photo_files, no_vitport
):
    """A bf16 port runs in bf16 by default (as vitport's bf16 run); --dtype fp32 overrides it."""
    name = "dinov2"
    source = tiny_dir(name)
    loaded = vitport.load(str(source))
    port = write_port(loaded, source, tmp_path / "port", manifest_of(loaded, PORT_FIXES, "bf16"))
    images, _ = read_images(photo_files)
    runs = {}
    for dtype in ("bf16", "fp32"):
        encoder = vitport.load(str(port), dtype=dtype)
        apply_fixes(encoder, PORT_FIXES)
        runs[dtype] = infer(encoder, images).features.patches

    out = tmp_path / "bf16.safetensors"
    run_script(port, photo_files, out, no_vitport, "--device", "cpu")
    by_default = load_file(str(out))["patches"]
    torch.testing.assert_close(by_default, runs["bf16"], atol=0.02, rtol=0.02)
    assert not torch.equal(by_default, runs["fp32"])  # it really ran in bf16

    out = tmp_path / "fp32.safetensors"
    run_script(port, photo_files, out, no_vitport, "--device", "cpu", "--dtype", "fp32")
    assert cosines(load_file(str(out))["patches"], runs["fp32"]).min() >= MIN_COS


@pytest.mark.parametrize("name", list(TINY))
def test_the_script_preprocesses_as_vitport(tiny_dir, photos, name):
    """The script's own preprocessing gives vitport's pixels (it runs here, in-process)."""
    encoder = vitport.load(str(tiny_dir(name)))
    script = inference_script(encoder, manifest_of(encoder, ()))
    namespace: dict[str, Any] = {"__name__": "inference", "__file__": SCRIPT}
    exec(compile(script, SCRIPT, "exec"), namespace)
    for photo in photos:
        want = encoder.preprocess([photo.image])[0]
        got = namespace["preprocess"](photo.image)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_the_script_writes_each_fix_out_in_order(tiny_dir):
    encoder = vitport.load(str(tiny_dir("dinov2")))
    fixes = ("layernorm-fp32", "erf-gelu", "no-tf32")
    script = inference_script(encoder, manifest_of(encoder, fixes))
    starts = [script.index(f"# {fix}:") for fix in fixes]
    assert starts == sorted(starts)
    assert "import vitport" not in script and "from vitport" not in script
    none = inference_script(encoder, manifest_of(encoder, ()))
    assert "# erf-gelu:" not in none
    compile(none, SCRIPT, "exec")


@pytest.mark.slow
def test_a_port_without_weights_says_what_it_needs(tiny_dir, tmp_path, photo_files, no_vitport):
    source = tiny_dir("dinov2")
    encoder = vitport.load(str(source))
    port = tmp_path / "port"
    port.mkdir()
    (port / SCRIPT).write_text(inference_script(encoder, manifest_of(encoder, PORT_FIXES)))
    command = [sys.executable, str(port / SCRIPT), str(photo_files[0])]
    done = subprocess.run(command, env=no_vitport, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "no weights beside" in done.stderr and str(source) in done.stderr


def run_cli(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    from vitport.cli import main

    out = io.StringIO()
    with (
        pytest.MonkeyPatch.context() as mp,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(out),
    ):
        mp.setattr(sys, "argv", ["vitport", *args])
        mp.setenv("COLUMNS", "200")
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    return code, out.getvalue()


@pytest.mark.slow
def test_a_packaged_ports_script_reproduces_vitport(tiny_dir, tmp_path, photo_files, no_vitport):
    """The inference.py `report --package` writes, run without vitport, gives what vitport
    gives for the port with its fixes: in fp32 (--dtype) and in the port's own bf16."""
    from vitport.port.manifest import read_manifest

    port = tmp_path / "port"
    fixes = "erf-gelu,layernorm-fp32"
    args = ("--model", str(tiny_dir("dinov2_with_registers")), "--device", "cpu")
    quick = ("--batch-sizes", "1", "--min-seconds", "0.05", "--dtype", "bf16", "--fix", fixes)
    code, text = run_cli("report", *args, *quick, "--out", str(port), "--package")
    assert code == 0, text
    manifest = read_manifest(port)
    assert manifest.fixes == ("erf-gelu", "layernorm-fp32") and manifest.dtype == "bf16"

    images, _ = read_images(photo_files)
    for dtype, least in (("fp32", MIN_COS), ("bf16", 0.999)):
        encoder = vitport.load(str(port), dtype=dtype)
        apply_fixes(encoder, [f for f in manifest.fixes if f not in encoder.fixes])
        want = infer(encoder, images).features
        out = tmp_path / f"{dtype}.safetensors"
        flags = ("--dtype", "fp32") if dtype == "fp32" else ()
        run_script(port, photo_files, out, no_vitport, *flags)
        got = load_file(str(out))
        assert set(got) == {"cls", "patches", "pooled"}
        for group in got:
            worst = cosines(got[group], getattr(want, group)).min().item()
            assert worst >= least, f"{dtype} {group}: cos {worst:.6f}"
