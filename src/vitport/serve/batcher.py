"""Dynamic batching: images from many requests gathered into device batches.

One bounded queue, counted in images, and one worker thread per device that takes up to
`max_batch` images, waiting at most `max_wait_s` after the first for the batch to fill. An
image's future is cancelled when its request gives up (timeout, client gone); the worker drops
cancelled images when it gathers a batch, so abandoned work never reaches the device.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from vitport.encoder import Encoder
from vitport.serve.metrics import Metrics

POLL_S = 0.1  # how often an idle worker looks at the stop flag


class QueueFull(Exception):
    """No room for a request's images; ``retry_after`` is when there should be, in seconds."""

    def __init__(self, wanted: int, free: int, retry_after: int) -> None:
        super().__init__(f"queue full: {wanted} images asked for, room for {free}")
        self.retry_after = retry_after


class Ticket:
    """One request's hold on its images: `gone` once it gave up (timeout, client left)."""

    gone = False


@dataclass
class Job:
    pixels: torch.Tensor  # [3, H, W]
    future: Future  # -> dict[str, torch.Tensor]: each output group's row, CPU float32
    queued: float  # time.monotonic() when submitted
    ticket: Ticket


class Batcher:
    """The queue and its device workers; thread-safe."""

    def __init__(
        self,
        encoders: Sequence[Encoder],
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        metrics: Metrics,
    ) -> None:
        self.encoders = list(encoders)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # admitted and not yet taken by a worker (decoding included)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._busy_s = 0.0  # device time so far, for Retry-After
        self._done = 0

    # ------------------------------------------------------------- admission

    @property
    def pending(self) -> int:
        return self._pending

    def admit(self, count: int) -> None:
        """Reserve room for `count` images, or raise QueueFull: never an unbounded wait."""
        with self._lock:
            free = self.max_queue - self._pending
            if count > free:
                raise QueueFull(count, max(free, 0), self.retry_after(count))
            self._pending += count
            self.metrics.queue_depth.set(self._pending)

    def release(self, count: int) -> None:
        """Give back room admitted for images that will not be submitted."""
        with self._lock:
            self._pending -= count
            self.metrics.queue_depth.set(self._pending)

    def retry_after(self, extra: int = 0) -> int:
        """Seconds until the queue should have room, from the throughput measured so far."""
        rate = self._done / self._busy_s if self._busy_s > 0 else 0.0
        if rate <= 0:
            return 1
        return max(1, math.ceil((self._pending + extra - self.max_queue / 2) / rate))

    def submit(self, pixels: Sequence[torch.Tensor], ticket: Ticket) -> list[Future]:
        """Queue admitted images; each future gives that image's outputs."""
        futures = []
        queued = time.monotonic()
        for p in pixels:
            job = Job(p, Future(), queued, ticket)
            self._queue.put(job)
            futures.append(job.future)
        return futures

    # ------------------------------------------------------------- workers

    def start(self) -> None:
        for k, encoder in enumerate(self.encoders):
            thread = threading.Thread(
                target=self._work,
                args=(encoder,),
                daemon=True,
                name=f"vitport-device-{k}-{encoder.device}",
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers; images still queued fail (drain first to finish them)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the server stopped"))

    def _work(self, encoder: Encoder) -> None:
        buffer = None
        if encoder.device.pin_memory:  # one pinned staging buffer per device, reused
            height, width = encoder.image_size
            buffer = torch.empty((self.max_batch, 3, height, width), dtype=encoder.dtype)
            buffer = buffer.pin_memory()
        while not self._stop.is_set():
            jobs = [j for j in self._gather() if not j.ticket.gone]  # gave up while it filled
            if jobs:
                self._encode(encoder, jobs, buffer)

    def _take(self, job: Job, jobs: list[Job]) -> None:
        with self._lock:
            self._pending -= 1
            self.metrics.queue_depth.set(self._pending)
        if not job.ticket.gone and job.future.set_running_or_notify_cancel():
            self.metrics.queue_wait.observe(time.monotonic() - job.queued)
            jobs.append(job)

    def _gather(self) -> list[Job]:
        """Block for a first image, then take more until the batch is full or max_wait is up."""
        try:
            first = self._queue.get(timeout=POLL_S)
        except queue.Empty:
            return []
        jobs: list[Job] = []
        self._take(first, jobs)
        deadline = time.monotonic() + self.max_wait_s
        while len(jobs) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            self._take(job, jobs)
        return jobs

    def _encode(self, encoder: Encoder, jobs: list[Job], buffer: torch.Tensor | None) -> None:
        count = len(jobs)
        device = encoder.device
        try:
            if buffer is not None:
                pixels = torch.stack([j.pixels for j in jobs], out=buffer[:count])
                pixels = pixels.to(device.torch_device, non_blocking=True)
            else:
                pixels = torch.stack([j.pixels for j in jobs])
            with device.timer() as timer:
                features = encoder.encode(pixels)
            groups = {k: v.to("cpu", torch.float32) for k, v in features.groups().items()}
        except Exception as exc:  # noqa: BLE001 - one bad image must not fail its neighbours
            if count > 1:
                for job in jobs:
                    self._encode(encoder, [job], buffer)
                return
            self.metrics.errors.labels("device").inc()
            jobs[0].future.set_exception(exc)
            return
        self.metrics.batch_size.observe(count)
        self.metrics.device_time.observe(timer.seconds)
        self._busy_s += timer.seconds
        self._done += count
        for k, job in enumerate(jobs):
            job.future.set_result({name: value[k] for name, value in groups.items()})
