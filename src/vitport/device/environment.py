"""What the machine runs: CPU name, NVIDIA and Ascend driver versions, CANN, package versions.

Every reader here returns None (or ``"not installed"``) rather than raising: descriptions of a
machine must never stop a run.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys

__all__ = [
    "GIB",
    "ascend_driver_version",
    "cann_version",
    "cpu_name",
    "dist_version",
    "gib",
    "nvidia_driver_version",
]

GIB = 1024**3


def gib(n: int | None) -> str | None:
    """``"12.3 GiB"`` for a byte count; None for None."""
    return None if n is None else f"{n / GIB:.1f} GiB"


BACKEND_PACKAGES = {"npu": ("torch_npu",)}


def backend_packages(device_type: str) -> tuple[str, ...]:
    """The packages a device type needs installed beside torch (a port's requirements)."""
    return BACKEND_PACKAGES.get(device_type, ())


def dist_version(name: str) -> str:
    """The installed version of a distribution, or ``"not installed"``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _read_first(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def cpu_name() -> str:
    """The CPU's model name, from /proc/cpuinfo, sysctl on macOS, or the platform module."""
    text = _read_first("/proc/cpuinfo")
    if text:
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    if sys.platform == "darwin":
        try:
            brand = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            brand = ""
        if brand:
            return brand
    return platform.processor() or platform.machine()


def nvidia_driver_version() -> str | None:
    """The NVIDIA kernel module's version, from /proc/driver/nvidia/version."""
    text = _read_first("/proc/driver/nvidia/version")
    if text:
        match = re.search(r"Kernel Module(?: for \S+)?\s+(\d[\d.]+)", text)
        if match:
            return match.group(1)
    return None


def _version_line(text: str) -> str | None:
    match = re.search(r"^\s*(?:version|Version)\s*=\s*(\S+)", text, re.MULTILINE)
    return match.group(1).strip("\"'") if match else None


def cann_version() -> str | None:
    """CANN version: torch_npu's own query when it has one, else the toolkit's install info."""
    torch_npu = sys.modules.get("torch_npu")
    if torch_npu is not None:
        for owner in (getattr(torch_npu, "utils", None), getattr(torch_npu, "npu", None)):
            get = getattr(owner, "get_cann_version", None) if owner is not None else None
            if get is None:
                get = getattr(getattr(owner, "utils", None), "get_cann_version", None)
            if get is not None:
                try:
                    version = get()
                    if version:
                        return str(version)
                except Exception:
                    pass
    homes = [
        os.environ.get("ASCEND_TOOLKIT_HOME"),
        os.environ.get("ASCEND_HOME_PATH"),
        "/usr/local/Ascend/ascend-toolkit/latest",
    ]
    arch = platform.machine().lower().replace("arm64", "aarch64").replace("amd64", "x86_64")
    for home in filter(None, homes):
        for rel in (
            f"{arch}-linux/ascend_toolkit_install.info",
            f"{arch}-linux/ascend_all_cann_install.info",
            "version.cfg",
            "compiler/version.info",
            "runtime/version.info",
        ):
            text = _read_first(os.path.join(home, rel))
            version = _version_line(text) if text else None
            if version:
                return version
    return None


def ascend_driver_version() -> str | None:
    """The Ascend driver's version, from /usr/local/Ascend/driver/version.info."""
    text = _read_first("/usr/local/Ascend/driver/version.info")
    return _version_line(text) if text else None
