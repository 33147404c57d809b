"""A half-installed torch_npu never crashes vitport.

A fake `torch_npu` distribution is registered through the entry point the real one uses
(`torch.backends`), so torch's device-backend autoload imports it; its import raises the real
error text of a box whose CANN set_env.sh was not sourced, or of a torch_npu built for another
torch. Everything runs in subprocesses, as a user's shell would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import vitport

CANN_MISSING = (
    "libhccl.so: cannot open shared object file: No such file or directory. Please check that "
    "the cann package is installed. Please run 'source set_env.sh' in the CANN installation path."
)
SYMBOL = "/site-packages/torch_npu/_C.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv"


pytestmark = pytest.mark.slow  # every check is a fresh Python process


def fake_torch_npu(root: Path, message: str, torch_spec: str = "") -> Path:
    package = root / "torch_npu"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"raise ImportError({message!r})\n")
    info = root / "torch_npu-2.14.0.dist-info"
    info.mkdir()
    requires = f"Requires-Dist: torch{torch_spec}\n" if torch_spec else ""
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.14.0\n{requires}"
    )
    (info / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    return root


def run(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    source = str(Path(vitport.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join([str(root), source])
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def cann_missing(tmp_path_factory) -> Path:
    return fake_torch_npu(tmp_path_factory.mktemp("fake-npu"), CANN_MISSING)


def test_the_fake_breaks_plain_torch_as_the_real_one_does(cann_missing):
    got = run(cann_missing, "-c", "import torch")
    assert got.returncode != 0 and "Failed to load the backend extension: torch_npu" in got.stderr


def test_devices_lists_what_works_and_names_the_cure(cann_missing):
    got = run(cann_missing, "-m", "vitport", "devices")
    assert got.returncode == 0, got.stderr
    assert "available: cpu" in got.stdout
    assert "libhccl.so" in got.stdout and "source set_env.sh" in got.stdout.replace("'", "")


def test_cpu_works_and_npu_is_one_line_exit_2(cann_missing, tiny_dir):
    model = str(tiny_dir("dinov2"))
    cpu = run(cann_missing, "-m", "vitport", "infer", "--model", model, "--device", "cpu")
    assert cpu.returncode == 0, cpu.stderr
    npu = run(cann_missing, "-m", "vitport", "infer", "--model", model, "--device", "npu")
    assert npu.returncode == 2
    lines = npu.stderr.strip().splitlines()
    assert len(lines) == 1 and "set_env.sh" in lines[0] and "Traceback" not in npu.stderr


def test_library_import_before_torch_survives(cann_missing):
    script = "import vitport, torch; from vitport.device import resolve_device; print(resolve_device('auto'))"
    got = run(cann_missing, "-c", script)
    assert got.returncode == 0 and got.stdout.strip() == "cpu", got.stderr


def test_version_mismatch_names_the_matching_pair(tmp_path):
    root = fake_torch_npu(tmp_path, SYMBOL, torch_spec="==2.9.*")
    got = run(root, "-m", "vitport", "devices")
    assert got.returncode == 0, got.stderr
    assert "built for torch==2.9.*" in got.stdout and "pip install" in got.stdout


def test_import_vitport_brings_a_working_torch_npu_in_as_autoload_would(tmp_path):
    """With autoload off, `import vitport; import torch` must still have torch_npu imported (the
    plain `import torch` a user expects), while no torch_npu keeps `import vitport` light."""
    root = fake_torch_npu(tmp_path / "npu", "unused")
    (root / "torch_npu" / "__init__.py").write_text(
        "import torch\n\n\ndef _autoload():\n    pass\n"
    )
    script = "import vitport, sys; print('torch_npu' in sys.modules, 'torch' in sys.modules)"
    assert run(root, "-c", script).stdout.split() == ["True", "True"]
    assert run(tmp_path / "none", "-c", script).stdout.split() == ["False", "False"]
