"""What a served encoder is and the limits it holds to: one frozen record, from the CLI or code."""

from __future__ import annotations

from dataclasses import dataclass

from vitport.runtimes.base import Setup

OUTPUTS = ("pooled", "cls", "registers", "patches")
MiB = 1 << 20


@dataclass(frozen=True)
class ServeConfig:
    """The served model (the flags of `vitport serve`) and its batching and limits.

    `devices` (one device worker each, behind one queue) wins over `device`. `max_batch_size`
    None picks bench's auto size on the first device at start-up. `reference` is a device to
    run CPU fp32-style references on, or a golden file; `check=False` serves without the
    self-check (--no-check)."""

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
