"""Tests of vitport.device. No NPU or GPU is needed: the NPU branches run against a stand-in
``torch_npu`` module and a fake ``torch.npu`` device module built from plain Python."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import platform
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from vitport.cli.flags import cli_message
from vitport.device import (
    DTYPES,
    Device,
    available_devices,
    cuda_shim,
    disable_cuda_shim,
    dtype_name,
    enable_cuda_shim,
    out_of_memory_error,
    parse_dtype,
    resolve_device,
)
from vitport.errors import DeviceError, OutOfMemoryError, VitportError

FAKE_NAME = "Ascend910B-fake"
FAKE_VERSION = "2.5.1.post-fake"
GIB = 1024**3


class FakeNpu(types.ModuleType):
    """Plain-Python stand-in for the ``torch.npu`` module that torch_npu registers."""

    def __init__(self) -> None:
        super().__init__("torch.npu")
        self.calls: list[tuple[str, object]] = []
        self.allocated = 123_456
        self.peak = 654_321
        self.bf16 = True
        self.clock = time  # what its events read; a test may give it a FakeClock
        calls = self.calls
        npu = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                calls.append(("Event", enable_timing))
                self.enable_timing = enable_timing
                self.t: float | None = None

            def record(self, stream: object = None) -> None:
                calls.append(("event.record", None))
                self.t = npu.clock.perf_counter()

            def synchronize(self) -> None:
                calls.append(("event.synchronize", None))

            def elapsed_time(self, end_event: Event) -> float:
                assert self.enable_timing and self.t is not None and end_event.t is not None
                return (end_event.t - self.t) * 1000.0

        self.Event = Event

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def current_device(self) -> int:
        return 0

    def set_device(self, device: int) -> None:
        self.calls.append(("set_device", device))

    def synchronize(self, device: object = None) -> None:
        self.calls.append(("synchronize", device))

    def memory_allocated(self, device: object = None) -> int:
        self.calls.append(("memory_allocated", device))
        return self.allocated

    def max_memory_allocated(self, device: object = None) -> int:
        self.calls.append(("max_memory_allocated", device))
        return self.peak

    def reset_peak_memory_stats(self, device: object = None) -> None:
        self.calls.append(("reset_peak_memory_stats", device))
        self.peak = self.allocated

    def empty_cache(self) -> None:
        self.calls.append(("empty_cache", None))

    def get_device_name(self, device_name: object = None) -> str:  # torch_npu's parameter name
        return FAKE_NAME

    def get_device_properties(self, device_name: object = None) -> types.SimpleNamespace:
        return types.SimpleNamespace(name=FAKE_NAME, total_memory=64 * GIB)

    def is_bf16_supported(self) -> bool:
        return self.bf16

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture(autouse=True)
def forget_hidden_torch_npu(monkeypatch: pytest.MonkeyPatch):
    """A torch_npu hidden by one test (as broken) must not stay hidden for the next."""
    from vitport.device import npu

    hidden: dict[str, str] = {}
    monkeypatch.setattr(npu, "_HIDDEN", hidden)
    yield
    if hidden and sys.modules.get("torch_npu", False) is None:
        del sys.modules["torch_npu"]


@pytest.fixture
def no_torch_npu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import torch_npu`` fail as if it were not installed."""
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    monkeypatch.delattr(torch, "npu", raising=False)


@pytest.fixture
def fake_npu(monkeypatch: pytest.MonkeyPatch):
    """Install a stand-in torch_npu and torch.npu; undo the CUDA shim afterwards."""
    npu = FakeNpu()
    torch_npu = types.ModuleType("torch_npu")
    torch_npu.__version__ = FAKE_VERSION
    torch_npu.npu = npu
    monkeypatch.setitem(sys.modules, "torch_npu", torch_npu)
    monkeypatch.delitem(sys.modules, "torch_npu.contrib", raising=False)
    monkeypatch.delitem(sys.modules, "torch_npu.contrib.transfer_to_npu", raising=False)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    yield npu
    disable_cuda_shim()


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("float", torch.float32),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("half", torch.float16),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        (" BF16 ", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("fp64", torch.float64),
        ("float64", torch.float64),
        ("double", torch.float64),
        (torch.float16, torch.float16),
    ],
)
def test_parse_dtype_aliases(name: str | torch.dtype, dtype: torch.dtype) -> None:
    assert parse_dtype(name) is dtype


@pytest.mark.parametrize("bad", ["int8", "fp8", "", torch.int8])
def test_parse_dtype_error_lists_valid_names(bad: str | torch.dtype) -> None:
    with pytest.raises(DeviceError) as info:
        parse_dtype(bad)
    message = str(info.value)
    assert "\n" not in message
    for valid in ("fp32", "fp16", "bf16", "fp64"):
        assert valid in message


def test_dtype_name_roundtrip() -> None:
    assert dtype_name(torch.bfloat16) == "bf16"
    for name, dtype in DTYPES.items():
        assert dtype_name(dtype) == name
        assert parse_dtype(dtype_name(dtype)) is dtype
    assert dtype_name(torch.int8) == "int8"
    assert set(DTYPES) == {"fp32", "fp16", "bf16", "fp64"}


# --------------------------------------------------------------------------- Device basics


def test_device_str_and_torch_device() -> None:
    assert str(Device("cpu")) == "cpu"
    assert str(Device("cuda", 1)) == "cuda:1"
    assert str(Device("npu", 0)) == "npu:0"
    assert Device("cpu").torch_device == torch.device("cpu")
    assert Device("cuda", 1).torch_device == torch.device("cuda", 1)
    assert Device("cpu").module is None
    assert Device("cuda").module is torch.cuda
    assert not Device("cpu").is_async
    assert Device("cuda", 0).is_async and Device("npu", 0).is_async
    assert Device("cuda", 0) == Device("cuda", 0)  # frozen dataclass: hashable, comparable
    assert len({Device("cuda", 0), Device("cuda", 0)}) == 1


def test_cpu_device_basics() -> None:
    cpu = resolve_device("cpu")
    assert cpu == Device("cpu")
    assert cpu.memory_allocated() is None
    assert cpu.peak_memory() is None
    cpu.reset_peak_memory()
    cpu.empty_cache()
    cpu.synchronize()
    for dtype in DTYPES.values():
        assert cpu.supports(dtype)


def test_mps_has_no_fp64() -> None:
    assert not Device("mps").supports(torch.float64)


# --------------------------------------------------------------------------- resolution


def test_available_devices_here_ends_with_cpu(no_torch_npu: None) -> None:
    available = available_devices()
    assert available[-1] == "cpu"
    assert "npu" not in available


def test_auto_without_accelerators_is_cpu(no_torch_npu: None) -> None:
    device = resolve_device("auto")
    assert device.type == available_devices()[0]
    if available_devices() == ["cpu"]:
        assert device == Device("cpu")
    assert resolve_device() == device


def test_auto_picks_npu_when_present(fake_npu: FakeNpu) -> None:
    assert available_devices()[0] == "npu"
    assert available_devices()[-1] == "cpu"
    assert resolve_device("auto") == Device("npu", 0)


def test_resolve_npu_with_stand_in(fake_npu: FakeNpu) -> None:
    assert resolve_device("npu") == Device("npu", 0)
    assert resolve_device("npu:0") == Device("npu", 0)
    assert resolve_device("NPU:0") == Device("npu", 0)
    assert Device("npu", 0).module is fake_npu


def test_resolve_npu_index_out_of_range(fake_npu: FakeNpu) -> None:
    with pytest.raises(DeviceError) as info:
        resolve_device("npu:3")
    message = str(info.value)
    assert "npu:3" in message and "1 npu device" in message
    assert "\n" not in message


def test_resolve_npu_without_torch_npu(no_torch_npu: None) -> None:
    with pytest.raises(DeviceError) as info:
        resolve_device("npu")
    assert str(info.value) == (
        "device 'npu' needs torch_npu: pip install torch-npu matching your torch and CANN "
        "(see https://gitee.com/ascend/pytorch)"
    )
    with pytest.raises(DeviceError, match="needs torch_npu"):
        resolve_device("npu:1")


class _BrokenTorchNpuFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``torch_npu`` but fails to load it, like a torch_npu without CANN libraries."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torch_npu":
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise OSError("libhccl.so: cannot open shared object file: No such file or directory")


def test_resolve_npu_with_broken_torch_npu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTorchNpuFinder(), *sys.meta_path])
    with pytest.raises(DeviceError) as info:
        resolve_device("npu")
    message = str(info.value)
    assert "does not import" in message and "libhccl.so" in message and "set_env.sh" in message
    assert "\n" not in message
    assert "npu" not in available_devices()


def test_cuda_unavailable_message(monkeypatch: pytest.MonkeyPatch, no_torch_npu: None) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError) as info:
        resolve_device("cuda")
    message = str(info.value)
    assert message.startswith("device 'cuda' is not available on this machine (available: ")
    assert message.endswith("or install the backend")
    assert "\n" not in message
    if available_devices() == ["cpu"]:
        assert message == (
            "device 'cuda' is not available on this machine (available: cpu); "
            "use device=cpu or install the backend"
        )
        assert cli_message(info.value) == message.replace("device=cpu", "--device cpu")
    with pytest.raises(DeviceError, match="not available"):
        resolve_device("cuda:1")


def test_an_unavailable_reference_device_names_the_reference_flag(
    monkeypatch: pytest.MonkeyPatch, no_torch_npu: None
) -> None:
    """compare --device cpu --reference cuda: the flag at fault is --reference, not --device."""
    from vitport.compare.check import open_source

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError) as info:
        open_source("cuda")
    line = cli_message(info.value)
    assert "--reference cpu" in line and "--device" not in line


@pytest.mark.parametrize("spec", ["gpu", "tpu", "cuda:abc", "cuda:-1", "", "cuda:0:1", "npu0"])
def test_bad_spec(spec: str) -> None:
    with pytest.raises(DeviceError) as info:
        resolve_device(spec)
    message = str(info.value)
    assert "unknown device" in message
    for form in ("auto", "cpu", "cuda:N", "npu:N", "xpu", "mps"):
        assert form in message
    assert isinstance(info.value, VitportError)


# --------------------------------------------------------------------------- timing


def test_cpu_timer_measures_sleep(fake_clock) -> None:
    with Device("cpu").timer() as t:
        fake_clock.sleep(0.05)
    assert t.seconds == pytest.approx(0.05, abs=1e-5)
    assert t.method == "synchronize"


def test_timer_seconds_before_exit_raises() -> None:
    timer = Device("cpu").timer()
    with pytest.raises(RuntimeError):
        _ = timer.seconds


def test_timer_lets_errors_through() -> None:
    with pytest.raises(ValueError), Device("cpu").timer() as t:
        raise ValueError("boom")
    with pytest.raises(RuntimeError):
        _ = t.seconds


def test_npu_timer_uses_events_and_synchronizes(fake_npu: FakeNpu, fake_clock) -> None:
    fake_npu.clock = fake_clock
    device = resolve_device("npu")
    with device.timer() as t:
        fake_clock.sleep(0.05)
    assert t.method == "events"
    assert t.seconds == pytest.approx(0.05, abs=1e-5)
    names = fake_npu.names()
    assert ("Event", True) in fake_npu.calls  # created with enable_timing=True
    assert names.count("event.record") == 2
    assert "event.synchronize" in names
    # synchronized before the start edge and after the end edge
    assert names.index("synchronize") < names.index("event.record")
    assert names[-1] == "synchronize"


def test_npu_timer_without_events_synchronizes_both_edges(
    fake_npu: FakeNpu, monkeypatch: pytest.MonkeyPatch, fake_clock
) -> None:
    monkeypatch.delattr(fake_npu, "Event")
    device = resolve_device("npu")
    with device.timer() as t:
        fake_clock.sleep(0.05)
    assert t.method == "synchronize"
    assert t.seconds == pytest.approx(0.05, abs=1e-5)
    assert fake_npu.names() == ["synchronize", "synchronize"]


# --------------------------------------------------------------------------- memory


def test_memory_functions_route_to_npu_module(fake_npu: FakeNpu) -> None:
    device = resolve_device("npu:0")
    assert device.memory_allocated() == 123_456
    assert device.peak_memory() == 654_321
    device.reset_peak_memory()
    assert device.peak_memory() == 123_456
    device.empty_cache()
    device.synchronize()
    assert ("memory_allocated", 0) in fake_npu.calls
    assert ("reset_peak_memory_stats", 0) in fake_npu.calls
    assert ("empty_cache", None) in fake_npu.calls
    assert ("synchronize", 0) in fake_npu.calls


def test_npu_supports_follows_backend(fake_npu: FakeNpu) -> None:
    device = resolve_device("npu")
    assert device.supports(torch.float16) and device.supports(torch.float32)
    assert device.supports(torch.bfloat16)
    fake_npu.bf16 = False
    assert not device.supports(torch.bfloat16)


# --------------------------------------------------------------------------- out of memory


def test_is_out_of_memory(fake_npu: FakeNpu) -> None:
    npu = resolve_device("npu")
    cpu = Device("cpu")
    torch_oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    npu_oom = RuntimeError(
        "NPU out of memory. Tried to allocate 2.00 GiB (NPU 0; 60.97 GiB total capacity; "
        "58.10 GiB already allocated)"
    )
    for device in (npu, cpu):
        assert device.is_out_of_memory(torch_oom)
        assert device.is_out_of_memory(npu_oom)
        assert not device.is_out_of_memory(RuntimeError("shape mismatch: [2, 3] vs [3, 2]"))
        assert not device.is_out_of_memory(ValueError("out of range"))
    assert cpu.is_out_of_memory(MemoryError())
    assert cpu.is_out_of_memory(
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
    )
    assert not npu.is_out_of_memory(MemoryError())


def test_out_of_memory_error_message(fake_npu: FakeNpu) -> None:
    device = resolve_device("npu")
    fake_npu.peak = int(12.3 * GIB)
    cause = RuntimeError("NPU out of memory. Tried to allocate 2.00 GiB")
    error = out_of_memory_error(device, cause, "running batch size 256")
    assert isinstance(error, OutOfMemoryError)
    assert str(error) == (
        "out of memory on npu:0 while running batch size 256 (peak 12.3 GiB); "
        "try a smaller batch_sizes or dtype='bf16'"
    )
    assert cli_message(error) == (
        "out of memory on npu:0 while running batch size 256 (peak 12.3 GiB); "
        "try a smaller --batch-sizes or --dtype bf16"
    )
    assert error.__cause__ is cause
    cpu_error = out_of_memory_error(Device("cpu"), MemoryError(), "loading weights")
    assert cli_message(cpu_error) == (
        "out of memory on cpu while loading weights; try a smaller --batch-sizes or --dtype bf16"
    )


# --------------------------------------------------------------------------- describe


def test_describe_cpu() -> None:
    info = Device("cpu").describe()
    for key in ("device", "name", "python", "torch", "torch_npu", "transformers", "timm", "os"):
        assert key in info
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in info.items())
    assert all(k == k.lower() and " " not in k for k in info)
    assert info["torch"] == torch.__version__
    assert info["python"] == platform.python_version()


def test_describe_npu(fake_npu: FakeNpu, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    arch = platform.machine().lower().replace("arm64", "aarch64").replace("amd64", "x86_64")
    info_dir = tmp_path / f"{arch}-linux"
    info_dir.mkdir()
    (info_dir / "ascend_toolkit_install.info").write_text(
        "package_name=Ascend-cann-toolkit\nversion=8.0.RC3\ninnerversion=V100R001C19\n"
    )
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(tmp_path))
    info = resolve_device("npu").describe()
    assert info["device"] == "npu:0"
    assert info["name"] == FAKE_NAME
    assert info["torch_npu"] == FAKE_VERSION
    assert info["total_memory"] == "64.0 GiB"
    assert info["cann"] == "8.0.RC3"
    assert all(isinstance(v, str) for v in info.values())


def test_describe_never_raises(fake_npu: FakeNpu, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("driver gone")

    for name in ("get_device_name", "get_device_properties"):
        monkeypatch.setattr(fake_npu, name, broken)
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", "/nonexistent/ascend")
    info = Device("npu", 0).describe()
    assert info["name"] == "unknown"
    assert info["torch_npu"] == FAKE_VERSION
    # even a device type whose backend does not exist at all
    assert Device("xpu", 7).describe()["device"] == "xpu:7"


# --------------------------------------------------------------------------- CUDA shim


def test_cuda_shim_needs_torch_npu(no_torch_npu: None) -> None:
    with pytest.raises(DeviceError, match="needs torch_npu"):
        enable_cuda_shim()


def test_cuda_shim_forwards_and_restores(fake_npu: FakeNpu) -> None:
    original_count = torch.cuda.device_count
    original_available = torch.cuda.is_available
    description = enable_cuda_shim()
    assert "forwarded" in description and "device_count" in description
    assert torch.cuda.device_count() == 1
    assert torch.cuda.is_available() is True
    assert torch.cuda.get_device_name(0) == FAKE_NAME
    torch.cuda.synchronize()
    assert "synchronize" in fake_npu.names()
    assert enable_cuda_shim() == description  # idempotent
    assert disable_cuda_shim() is True
    assert torch.cuda.device_count is original_count
    assert torch.cuda.is_available is original_available
    assert disable_cuda_shim() is False  # nothing left to undo


def test_cuda_shim_prefers_transfer_to_npu(
    fake_npu: FakeNpu, monkeypatch: pytest.MonkeyPatch
) -> None:
    contrib = types.ModuleType("torch_npu.contrib")
    transfer = types.ModuleType("torch_npu.contrib.transfer_to_npu")
    monkeypatch.setitem(sys.modules, "torch_npu.contrib", contrib)
    monkeypatch.setitem(sys.modules, "torch_npu.contrib.transfer_to_npu", transfer)
    original_count = torch.cuda.device_count
    description = enable_cuda_shim()
    assert "transfer_to_npu" in description
    assert torch.cuda.device_count is original_count  # vitport itself patched nothing
    assert disable_cuda_shim() is False


def test_module_state_is_clean() -> None:
    # The shim state is process-global; every test above must have undone it.
    assert cuda_shim._shim_saved == {}
    assert cuda_shim._shim_state == {}
