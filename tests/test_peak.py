"""The roofline peak: vendor figures and a measured matmul rate."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch

from vitport.bench import peak
from vitport.bench.peak import (
    PeakResult,
    clear_peak_cache,
    measure_peak,
    peak_dtype_key,
    vendor_peak,
)
from vitport.device import Device


@pytest.fixture(autouse=True)
def fresh_cache():
    clear_peak_cache()
    yield
    clear_peak_cache()


class FixedTimer:
    """A device timer that reports a known time for every region."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.method = "fake"


class FakeDevice:
    """Device-like: tensors live on the cpu, every timed region reports ``seconds``."""

    type = "cpu"
    torch_device = torch.device("cpu")

    def __init__(self, seconds: float) -> None:
        self.fixed = seconds
        self.regions = 0

    def __str__(self) -> str:
        return f"fake({self.fixed})"

    @contextmanager
    def timer(self):
        self.regions += 1
        yield FixedTimer(self.fixed)


def test_measured_on_cpu():
    result = measure_peak(Device("cpu"), torch.float32, size=256, min_seconds=0.05)
    assert result.dtype == "fp32" and result.size == 256
    assert math.isfinite(result.tflops) and result.tflops > 0
    assert result.seconds > 0 and result.iterations >= 5
    assert result.tflops == pytest.approx(2 * 256**3 / result.seconds / 1e12)


def test_rate_is_two_n_cubed_over_the_median():
    device = FakeDevice(0.5)
    result = measure_peak(device, torch.float32, size=256, min_seconds=1.0)
    assert result == PeakResult("fp32", 256, 2 * 256**3 / 0.5 / 1e12, 0.5, 5)
    # the mm/linear probe (one region each) + first call + 3 warm-up + 5 measured (5 x 0.5 s >= 1 s)
    assert device.regions == 2 + 1 + 3 + 5


def test_cached_per_device_dtype_and_size():
    device = FakeDevice(0.25)
    first = measure_peak(device, torch.float32, size=64)
    assert measure_peak(device, torch.float32, size=64) is first
    regions = device.regions
    measure_peak(device, torch.float32, size=32)
    measure_peak(device, torch.bfloat16, size=32)
    measure_peak(FakeDevice(0.125), torch.float32, size=64)
    assert device.regions == 3 * regions  # two new (device, dtype, size) keys, measured once each
    clear_peak_cache()
    assert measure_peak(device, torch.float32, size=64) is not first


@pytest.mark.parametrize(("kind", "size"), [("cpu", 2048), ("cuda", 8192), ("npu", 8192)])
def test_default_size(monkeypatch, kind, size):
    seen = []

    def fake_measure(device, dtype, n, min_seconds):
        seen.append(n)
        return PeakResult("fp32", n, 1.0, 1.0, 1)

    monkeypatch.setattr(peak, "_measure", fake_measure)
    assert measure_peak(Device(kind, None if kind == "cpu" else 0), torch.float32).size == size
    assert seen == [size]


def test_bad_size_is_refused():
    with pytest.raises(ValueError):
        measure_peak(Device("cpu"), torch.float32, size=0)


# --------------------------------------------------------------------------- vendor figures


@pytest.mark.parametrize(
    ("name", "dtype", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 80GB HBM3", torch.float16, 989.4),
        ("NVIDIA H100 80GB HBM3", "fp32", 66.9),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.7),
        ("NVIDIA H100 PCIe", "bf16", 756.5),
        ("NVIDIA H100 NVL", "bf16", 835.5),
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA H200 NVL", "bf16", 835.5),
        ("NVIDIA GH200 480GB", "bf16", 989.4),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100-PCIE-40GB", "float32", 19.5),
        ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
        ("NVIDIA L40S", "bf16", 362.05),
        ("NVIDIA GeForce RTX 4090", "fp16", 165.2),
    ],
)
def test_vendor_peak(name, dtype, tflops):
    assert vendor_peak(name, dtype) == tflops


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("NVIDIA L40", "bf16"),  # not an L40S
        ("NVIDIA GeForce RTX 4090 D", "bf16"),  # cut-down variant
        ("Ascend910B2", "fp16"),  # no confirmed vendor figure
        ("Intel(R) Xeon(R) Platinum 8480+", "fp32"),
        ("NVIDIA H100 80GB HBM3", "fp64"),  # dtype not listed
        ("", "bf16"),
    ],
)
def test_vendor_peak_unknown(name, dtype):
    assert vendor_peak(name, dtype) is None


def test_peak_dtype_key(monkeypatch):
    assert peak_dtype_key(torch.bfloat16) == "bf16"
    monkeypatch.setattr(peak, "tf32_enabled", lambda: False)
    assert peak_dtype_key(torch.float32) == "fp32"
    monkeypatch.setattr(peak, "tf32_enabled", lambda: True)
    assert peak_dtype_key(torch.float32) == "tf32"
    assert peak_dtype_key(torch.float16) == "fp16"


def test_tf32_setting_is_readable():
    assert isinstance(peak.tf32_enabled(), bool)


def test_the_faster_of_mm_and_linear_is_measured(monkeypatch, fake_clock):
    """Neither op is the ceiling everywhere (bf16 mm has a slow fallback on some CPUs): the
    probe's faster one is what the peak times."""
    slow_calls = []

    def slow_mm(a, b):
        slow_calls.append(1)
        fake_clock.sleep(0.01)  # linear takes no clock time
        return a @ b

    monkeypatch.setattr(peak, "MATMULS", (slow_mm, torch.nn.functional.linear))
    assert peak._faster_matmul(Device("cpu"), torch.float32, size=8) is torch.nn.functional.linear
    calls = len(slow_calls)
    measure_peak(Device("cpu"), torch.float32, size=64, min_seconds=0.0)
    assert len(slow_calls) == 2 * calls  # probed again, never timed
