"""vitport's NPU calls, and the stand-in the device tests use, checked against the real wheels.

The real torch-npu and modelscope wheels are downloaded from PyPI once (cached in
$VITPORT_WHEEL_CACHE, default ~/.cache/vitport/wheels) and read as files, never imported: their
Python sources give names and signatures, torch_npu's operator schema YAML gives the ops."""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_devices import FakeNpu

TORCH_NPU = "torch-npu==2.14.0"
MODELSCOPE = "modelscope==1.34.0"
CACHE = Path(os.environ.get("VITPORT_WHEEL_CACHE", Path.home() / ".cache" / "vitport" / "wheels"))


def wheel(requirement: str) -> zipfile.ZipFile:
    name, version = requirement.split("==")
    stem = name.replace("-", "_")
    found = sorted(CACHE.glob(f"{stem}-{version}-*.whl"))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        got = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.11",
                "-d",
                str(CACHE),
                requirement,
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        found = sorted(CACHE.glob(f"{stem}-{version}-*.whl"))
        if got.returncode or not found:
            pytest.skip(f"PyPI unreachable, cannot fetch {requirement}: {got.stderr[-200:]}")
    return zipfile.ZipFile(found[0])


class Sources:
    """Top-level functions and classes of a package's Python files, and what a module exports.

    Files are parsed when a lookup needs them (a wheel holds thousands), in the wheel's order."""

    def __init__(self, archive: zipfile.ZipFile, folder: str) -> None:
        self.archive = archive
        self.files = [n for n in archive.namelist() if n.startswith(folder) and n.endswith(".py")]
        self._trees: dict[str, ast.Module] = {}
        self._text: dict[str, bytes] = {}
        self.defs = _FirstTopLevel(self, ast.FunctionDef, b"def ")
        self.classes = _FirstTopLevel(self, ast.ClassDef, b"class ")

    def text(self, name: str) -> bytes:
        if name not in self._text:
            self._text[name] = self.archive.read(name)
        return self._text[name]

    def tree(self, name: str) -> ast.Module:
        if name not in self._trees:
            self._trees[name] = ast.parse(self.text(name))
        return self._trees[name]

    def exported(self, module: str) -> set[str]:
        names: set[str] = set()
        for node in self.tree(module).body:
            if isinstance(node, ast.ImportFrom) and node.names[0].name == "*" and node.level:
                star = f"{module.rsplit('/', 1)[0]}/{node.module.replace('.', '/')}.py"
                names.update(self.exported(star))  # `from .memory import *`
            elif isinstance(node, ast.ImportFrom):
                names.update(alias.asname or alias.name for alias in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        return names


class _FirstTopLevel:
    """sources.defs[name] / sources.classes[name]: the first top-level definition of ``name``."""

    def __init__(self, sources: Sources, kind: type, keyword: bytes) -> None:
        self.sources, self.kind, self.keyword = sources, kind, keyword

    def __getitem__(self, name: str) -> ast.FunctionDef | ast.ClassDef:
        needle = self.keyword + name.encode()
        for file in self.sources.files:
            if needle not in self.sources.text(file):
                continue  # not defined here: no need to parse it
            for node in self.sources.tree(file).body:
                if isinstance(node, self.kind) and node.name == name:
                    return node
        raise KeyError(name)


def accepts(real: ast.FunctionDef, stand_in) -> str | None:
    """None when every parameter the stand-in takes (by name, with its default or not) is
    accepted by the real function; else what differs."""
    args = real.args
    positional = [a.arg for a in args.posonlyargs + args.args]
    defaults = set(positional[len(positional) - len(args.defaults) :])
    keywords = {a.arg for a in args.kwonlyargs}
    kw_defaults = {a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d}
    for name, param in inspect.signature(stand_in).parameters.items():
        if name == "self":
            continue
        if name not in positional and name not in keywords and args.kwarg is None:
            return f"no parameter '{name}' (real: {ast.unparse(args)})"
        optional = param.default is not inspect.Parameter.empty
        if optional and name not in defaults and name not in kw_defaults and name in positional:
            return f"'{name}' has no default in the real one (real: {ast.unparse(args)})"
    return None


@pytest.fixture(scope="module")
def npu() -> Sources:
    return Sources(wheel(TORCH_NPU), "torch_npu/")


def stand_in_functions() -> list[str]:
    """The torch.npu functions the stand-in provides (`names`, its call log, is not one)."""
    members = vars(FakeNpu)
    return sorted(
        n
        for n, v in members.items()
        if not n.startswith("_") and inspect.isfunction(v) and n != "names"
    )


@pytest.mark.parametrize("name", stand_in_functions())
def test_every_torch_npu_function_of_the_stand_in_exists_with_its_signature(npu, name):
    """torch.npu is torch_npu.npu: the name must be exported there and take the same arguments."""
    assert name in npu.exported("torch_npu/npu/__init__.py"), f"torch.npu.{name} does not exist"
    problem = accepts(npu.defs[name], getattr(FakeNpu, name))
    assert problem is None, f"torch.npu.{name}: {problem}"


@pytest.mark.parametrize("method", ["record", "synchronize", "elapsed_time"])
def test_events_time_regions_as_vitport_uses_them(npu, method):
    assert "Event" in npu.exported("torch_npu/npu/__init__.py")
    event = npu.classes["Event"]
    methods = {n.name: n for n in event.body if isinstance(n, ast.FunctionDef)}
    assert method in methods, f"torch.npu.Event.{method} does not exist"
    fake_event = FakeNpu().Event
    assert accepts(methods[method], getattr(fake_event, method)) is None
    new = methods.get("__new__") or methods["__init__"]
    assert "enable_timing" in {a.arg for a in new.args.args + new.args.kwonlyargs}


def test_hf32_switches_are_the_ones_vitport_flips(npu):
    """fixes.no-tf32 sets torch.npu.matmul.allow_hf32 and torch.npu.conv.allow_hf32."""
    exported = npu.exported("torch_npu/npu/__init__.py")
    assert {"matmul", "conv"} <= exported
    source = npu.archive.read("torch_npu/npu/__init__.py").decode()
    assert "matmul = npu_config._allowHF32Matmul()" in source
    assert "conv = npu_config._allowHF32Conv()" in source
    config = npu.archive.read("torch_npu/npu/npu_config.py").decode()
    for cls in ("_allowHF32Matmul", "_allowHF32Conv"):
        body = config.split(f"class {cls}")[1].split("\nclass ")[0]
        assert 'name == "allow_hf32"' in body and "isinstance(value, bool)" in body


def test_erf_gelu_op_schema(npu):
    """fixes.erf-gelu calls torch_npu.npu_gelu(x, approximate='none')."""
    schema = npu.archive.read("torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml").decode()
    line = re.search(r"func: npu_gelu\((.*?)\) -> Tensor", schema)
    assert line and line.group(1) == "Tensor self, *, str approximate='none'"


def test_attention_on_the_npu_is_torch_npus_own_choice(npu):
    """torch_npu registers its own scaled_dot_product_attention and _fused_sdp_choice, so
    --attn sdpa reaches its fused kernel; which kernel it picks is compiled code, which is why
    vitport refuses --attn flash on the NPU instead of guessing."""
    schema = npu.archive.read("torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml").decode()
    assert "- func: scaled_dot_product_attention(Tensor query, Tensor key, Tensor value" in schema
    assert "- func: _fused_sdp_choice(Tensor query" in schema


def test_cuda_shim_and_version_and_cann_query(npu):
    names = set(npu.archive.namelist())
    assert "torch_npu/contrib/transfer_to_npu.py" in names
    assert "__version__" in npu.archive.read("torch_npu/version.py").decode()
    assert "get_cann_version" in npu.exported("torch_npu/utils/__init__.py")
    entry = npu.archive.read("torch_npu-2.14.0.dist-info/entry_points.txt").decode()
    assert "[torch.backends]" in entry and "torch_npu = torch_npu:_autoload" in entry


def test_modelscope_snapshot_download_takes_a_model_id():
    """families.modelscope_snapshot calls modelscope.snapshot_download(repo_id)."""
    scope = Sources(wheel(MODELSCOPE), "modelscope/")
    assert "snapshot_download" in scope.archive.read("modelscope/__init__.py").decode()
    real = scope.defs["snapshot_download"]
    first = (real.args.posonlyargs + real.args.args)[0].arg
    assert first == "model_id", ast.unparse(real.args)
