"""The region timer: honest wall time of device work, bounded by device events where they exist."""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitport.device.core import Device

__all__ = ["RegionTimer"]


class RegionTimer:
    """Context manager timing one region of device work; read ``seconds`` after the block.

    On an asynchronous device the region is bounded by device events (``torch.Event`` or the
    backend's ``Event`` with ``enable_timing``) and synchronized at exit; where the backend
    has no timing events the device is synchronized at both edges around
    ``time.perf_counter()``. ``method`` says which was used.
    """

    def __init__(self, device: Device) -> None:
        self.device = device
        self.method: str = ""
        self._seconds: float | None = None
        self._start: Any = None
        self._end: Any = None
        self._t0 = 0.0

    @property
    def seconds(self) -> float:
        """Seconds the region took; only valid after the ``with`` block ended normally."""
        if self._seconds is None:
            raise RuntimeError("RegionTimer.seconds read before the timed region finished")
        return self._seconds

    def __enter__(self) -> RegionTimer:
        self._seconds = None
        self._start = self._end = None
        # Work queued before the region must not be charged to it.
        self.device.synchronize()
        if self.device.is_async:
            start, end = self.device._new_event(), self.device._new_event()
            if start is not None and end is not None:
                try:
                    start.record()
                    self._start, self._end = start, end
                    self.method = "events"
                except Exception:
                    self._start = self._end = None
        if self._start is None:
            self.method = "synchronize"
            self._t0 = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            return  # the region failed: no time, and no sync that could hide the error
        if self._start is not None:
            self._end.record()
            self._end.synchronize()
            self.device.synchronize()
            self._seconds = float(self._start.elapsed_time(self._end)) / 1000.0
        else:
            self.device.synchronize()
            self._seconds = time.perf_counter() - self._t0
