"""What a served encoder is and the limits it holds to: one frozen record, from the CLI or code."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from vitport.runtimes.base import Setup

OUTPUTS = ("pooled", "cls", "registers", "patches")
MiB = 1 << 20


@dataclass(frozen=True)
class ServeConfig:
    """The served model (the flags of `vitport serve`) and its batching and limits.

    `devices` (one device worker each, behind one queue) wins over `device`. `max_batch_size`
    None picks bench's auto size on the first device at start-up. `reference` is a device to
    run CPU fp32-style references on, or a golden file; `check=False` serves without the
    self-check (--no-check). `api_key`: every /v1/* request must send `Authorization: Bearer
    KEY` (None: open to whoever reaches the port). `normalize`: embeddings with unit L2 norm
    (each vector, as OpenAI's and text-embeddings-inference's), unless a request says otherwise.
    `auto_batch_seconds` bounds the start-up sweep that picks the batch size."""

    model: str
    device: str = "auto"
    devices: tuple[str, ...] = ()
    dtype: str = "fp32"
    fixes: tuple[str, ...] = ()
    runtime: str = "torch"
    image_size: int | None = None
    weights: str | None = None
    trust_remote_code: bool = False
    model_name: str = ""  # the id clients send and /v1/models lists; default the spec
    max_batch_size: int | None = None
    max_wait_ms: float = 5.0
    workers: int = 2
    max_queue: int = 1024
    max_body_bytes: int = 64 * MiB
    max_images_per_request: int = 256
    timeout: float = 60.0
    allow_urls: bool = False
    reference: str = "cpu"
    reference_dtype: str = "fp32"
    check: bool = True
    thresholds: tuple[str, ...] = ()
    inject_fault: str | None = None
    drain_seconds: float = 30.0
    api_key: str | None = field(default=None, repr=False)
    normalize: bool = True
    auto_batch_seconds: float = 60.0

    @property
    def setup(self) -> Setup:
        """How each device's copy is set up to run (runtime, dtype, fixes)."""
        return Setup(self.runtime, self.dtype, fixes=self.fixes)

    @property
    def served_name(self) -> str:
        return self.model_name or self.model

    @property
    def device_list(self) -> tuple[str, ...]:
        return self.devices or (self.device,)


def open_to_all(host: str, api_key: str | None) -> str | None:
    """The warning for a server that anyone who reaches it may use: bound beyond the loopback
    interface without an API key. None when it is keyed or loopback-only."""
    if api_key:
        return None
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (
        f"listening on {host} without --api-key: anyone who can reach this port can embed "
        "with your model and devices (and read /v1/models); set --api-key KEY or "
        "VITPORT_API_KEY, or bind --host 127.0.0.1 behind an authenticating proxy"
    )
