"""The served encoder, below HTTP: load, self-check against a reference, pick the batch size,
warm up, then embed entries through the batcher; drain on shutdown. The ASGI app (app.py) and
the Ray Serve replica (ray_engine.py) both wrap one Service."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from vitport.errors import VitportError
from vitport.format import count
from vitport.serve.batcher import Batcher, QueueFull, Ticket
from vitport.serve.config import OUTPUTS, ServeConfig
from vitport.serve.inputs import Decoded, EntryError, decode
from vitport.serve.metrics import Metrics

log = logging.getLogger("vitport.serve")

AUTO_MAX_BATCH = 256  # serving batches beyond this only add latency
DISCONNECT_POLL_S = 0.25


class CheckFailed(VitportError):
    """The served configuration does not match its reference: the server stays not ready."""

    exit_code = 1

    def __init__(self, results: list[Any]) -> None:
        worst = max(r.worst_rel_error for r in results)
        failed = [c for r in results for c in r.verdict.failures]
        first = failed[0] if failed else None
        what = f"{first.group}.{first.metric} beyond its limit" if first else "no check ran"
        super().__init__(
            f"self-check failed: {what}, worst relative error {100 * worst:.3g}%; the server "
            "will not take traffic (fix the port, or check=False to serve without the check)",
            params=("check=False",),
        )
        self.results = results


class StartAbandoned(Exception):
    """The server began to stop while the model was still starting: it never becomes ready."""


class ServeError(Exception):
    """An HTTP error with its status, a short code and a one-line message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        entries: list[dict] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.param, self.headers, self.entries = param, headers or {}, entries or []


@dataclass(frozen=True)
class Entry:
    """One image of a request: its name and how to get its bytes (run in the decode pool)."""

    name: str
    read: Callable[[], bytes]


@dataclass(frozen=True)
class Embedded:
    """One image's outputs (CPU float32) and its decoded size."""

    outputs: dict[str, torch.Tensor]
    size: tuple[int, int]


class Service:
    """One served model. State: starting, loading, checking, warming, ready, draining, stopped
    or failed."""

    def __init__(self, config: ServeConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock  # times the start-up sweep (injectable: tests never read the wall)
        self.metrics = Metrics()
        self.state = "starting"
        self.error: BaseException | None = None
        self.checks: list[Any] = []  # CompareResult per device
        self.batcher: Batcher | None = None
        self.encoders: list[Any] = []
        self.output_shapes: dict[str, list[int]] = {}
        self.batch_source = ""
        self.auto_throughput: float | None = None
        self.auto_measured: dict[int, float] = {}  # batch size -> images/s, from the sweep
        self.reference_note = ""  # why the self-check runs against another reference
        self.started_at = int(time.time())
        self.in_flight = 0
        self._idle = threading.Event()
        self._idle.set()
        self.on_failed: Callable[[], None] | None = None  # e.g. stop the server
        self._stopping = threading.Event()  # set by drain or stop: start-up goes no further
        self._state_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, config.workers), thread_name_prefix="vitport-decode")

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    # ------------------------------------------------------------- start-up

    def start(self) -> None:
        """Load, check, size and warm up (blocking); the failure is kept in `error` and raised."""
        try:
            self._start()
        except StartAbandoned:
            log.debug("start-up abandoned: the server is stopping")
        except BaseException as exc:
            self.error = exc
            self.state = "failed"
            log.error("not serving: %s", exc)
            if self.on_failed is not None:
                self.on_failed()
            raise

    def _start(self) -> None:
        import vitport
        from vitport.compare.run import candidate_factory, run_check
        from vitport.device import resolve_device
        from vitport.fixes import parse_fixes
        from vitport.runtimes import check

        cfg = self.config
        self._go_on("loading")
        devices = [resolve_device(d) for d in cfg.device_list]
        fixes = parse_fixes(list(cfg.fixes))
        setup = cfg.setup
        for d in devices:  # refused before anything loads, a batch beyond the runtime's too
            sizes = [cfg.max_batch_size] if cfg.max_batch_size else None
            check(setup, d.type, sizes, "max_batch_size")
        base = vitport.load(
            cfg.model,
            "cpu",
            "fp32",
            fixes=(),
            image_size=cfg.image_size,
            weights=cfg.weights,
            trust_remote_code=cfg.trust_remote_code,
        )
        self.encoders = [
            candidate_factory(base, d, setup, cfg.inject_fault)(fixes)[0] for d in devices
        ]
        if cfg.check:
            self._go_on("checking")
            plan = self._assemble_check(base, self.encoders[0].dtype)
            self.checks = [
                run_check(base, encoder, plan, fixes=fixes, batch_size=4)
                for encoder in self.encoders
            ]
            for result in self.checks:
                log.info("self-check %s", check_line(result))
            if not all(r.passed for r in self.checks):
                raise CheckFailed(self.checks)
        del base
        self._go_on("warming")
        batch = cfg.max_batch_size or self._auto_batch()
        self.batch_source = "--max-batch-size" if cfg.max_batch_size else "bench's auto size"
        for encoder in self.encoders:  # first calls (kernel builds, compilation) off the clock
            self._go_on("warming")
            shapes = self._warm(encoder, batch)
        self.output_shapes = shapes
        with self._state_lock:  # ready, unless stop() came first
            self._go_on("ready")
            self.batcher = Batcher(
                self.encoders, batch, cfg.max_wait_ms / 1000, cfg.max_queue, self.metrics
            )
            self.batcher.start()
            self.metrics.ready.set(1)
            log.info(
                "ready: %s on %s (%s), batches of up to %d (%s)",
                cfg.served_name,
                ", ".join(str(e.device) for e in self.encoders),
                cfg.dtype,
                batch,
                self.batch_source,
            )

    def _go_on(self, state: str) -> None:
        """Enter the next start-up state, or stop here once the server is stopping."""
        if self._stopping.is_set():
            raise StartAbandoned
        self.state = state

    def _assemble_check(self, base: Any, dtype: torch.dtype) -> Any:
        """`vitport compare`'s check of the served configuration (inputs, limits, reference),
        against any reference compare takes: a device, a golden file or an msprobe dump. A
        reference that is the served configuration itself (the CPU in fp32 for a CPU fp32
        server) would agree to the last bit and prove nothing: the CPU in fp64 is the reference
        then, and the log says so."""
        from vitport.compare.check import assemble_check, open_source
        from vitport.compare.verdict import parse_threshold_overrides
        from vitport.device import Device, parse_dtype, resolve_device

        cfg = self.config
        try:
            overrides = parse_threshold_overrides(list(cfg.thresholds))
        except ValueError as exc:
            raise VitportError(str(exc)) from exc
        source = open_source(cfg.reference)
        reference_dtype = parse_dtype(cfg.reference_dtype)
        served = {e.device.type for e in self.encoders}
        if (
            isinstance(source, Device)
            and served == {source.type}
            and reference_dtype == dtype
            and cfg.runtime == "torch"
        ):
            self.reference_note = (
                f"the reference ({source.type} {cfg.reference_dtype}) is the served "
                "configuration itself, which proves nothing: checked against cpu fp64 instead"
            )
            log.info("self-check: %s", self.reference_note)
            source, reference_dtype = resolve_device("cpu"), torch.float64
        return assemble_check(
            base, source, dtype, overrides=overrides, reference_dtype=reference_dtype
        )

    def _auto_batch(self) -> int:
        """Bench's auto batch size on the first device: batches 1, 2, 4, ... in a short window
        each, until the throughput stops growing, memory runs out, or the next size would end
        past `auto_batch_seconds` (a busy machine must not hold start-up for minutes). Each
        size is logged as it is measured, and the choice with all it measured."""
        from vitport.bench import run as bench_run
        from vitport.bench.run import AUTO_MIN_GAIN, AUTO_PATIENCE, Window
        from vitport.errors import OutOfMemoryError
        from vitport.runtimes import runner

        cfg, encoder = self.config, self.encoders[0]
        budget = cfg.auto_batch_seconds
        cap = runner(cfg.runtime).limits.cap(AUTO_MAX_BATCH)
        window = Window(warmup_iters=2, warmup_seconds=0.2, min_iters=3, min_seconds=0.5)
        log.info(
            "auto batch size: timing batches 1, 2, 4, ... (up to %d) on %s, for at most %g s",
            cap,
            encoder.device,
            budget,
        )
        started = self.clock()
        speeds: dict[int, float] = {}
        batch, best, stale, stopped = 1, 0.0, 0, f"reached {cap}, the largest tried"
        while batch <= cap:
            self._go_on("warming")
            before = self.clock()
            try:
                run = bench_run.bench_batch(encoder, batch, window, cfg.setup)
            except OutOfMemoryError:
                encoder.device.empty_cache()
                if not speeds:
                    raise
                stopped = f"batch {batch} ran out of memory"
                break
            self._go_on("warming")  # stopped while it ran: nothing more is said
            now = self.clock()
            speeds[batch] = speed = run.measurement.images_per_second
            log.info(
                "auto batch size: batch %d: %.4g img/s (%s in %.0f of %g s)",
                batch,
                speed,
                count(len(speeds), "size"),
                now - started,
                budget,
            )
            stale = 0 if speed > best * (1 + AUTO_MIN_GAIN) else stale + 1
            best = max(best, speed)
            if stale >= AUTO_PATIENCE:
                stopped = f"no gain over the last {AUTO_PATIENCE} doublings"
                break
            if now - started + 2 * (now - before) > budget:  # the next, twice as large, would
                stopped = f"batch {2 * batch} would end past the {budget:g} s bound"
                break
            batch *= 2
        chosen = max(speeds, key=speeds.__getitem__)
        self.auto_measured, self.auto_throughput = speeds, speeds[chosen]
        log.info(
            "auto batch size: %d (%.4g img/s); measured %s; stopped: %s",
            chosen,
            speeds[chosen],
            ", ".join(f"{b}: {s:.4g}" for b, s in speeds.items()),
            stopped,
        )
        return chosen

    def _warm(self, encoder: Any, batch: int) -> dict[str, list[int]]:
        from vitport.bench.run import random_pixels

        features = encoder.encode(random_pixels(encoder, batch))
        encoder.device.synchronize()
        return {k: list(v.shape[1:]) for k, v in features.groups().items() if k in OUTPUTS}

    # ------------------------------------------------------------- requests

    def gate(self) -> None:
        """Refuse work unless ready: 503, with when to retry."""
        if self.state == "ready":
            return
        if self.state in ("draining", "stopped"):
            raise ServeError(
                503,
                "draining",
                "the server is shutting down; retry on another replica",
                headers={"Retry-After": "1"},
            )
        if self.state == "failed":
            raise ServeError(503, "not-ready", f"the server is not serving: {self.error}")
        raise ServeError(
            503,
            "not-ready",
            f"the model is not ready yet ({self.state})",
            headers={"Retry-After": "5"},
        )

    def check_output(self, output: str) -> None:
        if output not in OUTPUTS:
            raise ServeError(
                400,
                "bad-output",
                f"output {output!r} is not one of {', '.join(OUTPUTS)}",
                param="output",
            )
        if output not in self.output_shapes:
            have = ", ".join(o for o in OUTPUTS if o in self.output_shapes)
            raise ServeError(
                400,
                "bad-output",
                f"{self.config.model} has no {output} output; it has: {have}",
                param="output",
            )

    async def embed(
        self,
        entries: Sequence[Entry],
        param: str,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> list[Embedded]:
        """Decode, batch and encode a request's images; ServeError for what fails."""
        cfg = self.config
        started = time.monotonic()
        if not entries:
            raise ServeError(400, "empty", f"{param} holds no images", param=param)
        if len(entries) > cfg.max_images_per_request:
            raise ServeError(
                413,
                "too-many-images",
                f"{len(entries)} images in one request; "
                f"this server takes at most {cfg.max_images_per_request} "
                "(--max-images-per-request)",
                param=param,
            )
        assert self.batcher is not None
        if len(entries) > self.batcher.max_queue:
            raise ServeError(
                413,
                "too-many-images",
                f"{len(entries)} images in one request; "
                f"the queue holds {self.batcher.max_queue} (--max-queue)",
                param=param,
            )
        try:
            self.batcher.admit(len(entries))
        except QueueFull as exc:
            self.metrics.errors.labels("queue-full").inc()
            self.metrics.images.labels("rejected").inc(len(entries))
            raise ServeError(
                429,
                "queue-full",
                f"{exc}; retry in {exc.retry_after} s",
                headers={"Retry-After": str(exc.retry_after)},
            ) from exc
        try:
            loop = asyncio.get_running_loop()
            decoded = await asyncio.gather(
                *(loop.run_in_executor(self._pool, self._decode, e) for e in entries)
            )
        except BaseException:
            self.batcher.release(len(entries))
            raise
        bad = [(k, d) for k, d in enumerate(decoded) if isinstance(d, EntryError)]
        if bad:
            self.batcher.release(len(entries))
            for _, error in bad:
                self.metrics.errors.labels(error.code).inc()
            self.metrics.images.labels("bad").inc(len(bad))
            rows = [
                {"index": k, "name": entries[k].name, "code": e.code, "message": e.message}
                for k, e in bad
            ]
            k, first = bad[0]
            more = f" (and {len(bad) - 1} more bad entries)" if len(bad) > 1 else ""
            raise ServeError(
                400,
                first.code,
                f"{param}[{k}]: {first.message}{more}",
                param=f"{param}[{k}]",
                entries=rows,
            )
        ticket = Ticket()
        futures = self.batcher.submit([d.pixels for d in decoded], ticket)
        outputs = await self._wait(futures, ticket, started, disconnected)
        self.metrics.images.labels("ok").inc(len(entries))
        return [Embedded(o, d.size) for o, d in zip(outputs, decoded, strict=True)]

    def _decode(self, entry: Entry) -> Decoded | EntryError:
        encoder = self.encoders[0]
        try:
            return decode(entry.read(), entry.name, encoder.preprocess, encoder.dtype)
        except EntryError as exc:
            return exc

    async def _wait(
        self,
        futures: list[Future],
        ticket: Ticket,
        started: float,
        disconnected: Callable[[], Awaitable[bool]] | None,
    ) -> list[dict]:
        """The futures' results; on timeout (504) or a gone client, their work is dropped."""
        gathered = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        deadline = started + self.config.timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.metrics.errors.labels("timeout").inc()
                    self.metrics.images.labels("timeout").inc(len(futures))
                    raise ServeError(
                        504,
                        "timeout",
                        f"not done within {self.config.timeout:g} s "
                        "(--timeout); the request's work was dropped",
                    )
                done, _ = await asyncio.wait({gathered}, timeout=min(left, DISCONNECT_POLL_S))
                if done:
                    return gathered.result()
                if disconnected is not None and await disconnected():
                    self.metrics.errors.labels("disconnected").inc()
                    self.metrics.images.labels("disconnected").inc(len(futures))
                    raise ServeError(499, "disconnected", "the client went away")
        except BaseException as exc:
            ticket.gone = True
            for f in futures:
                f.cancel()
            gathered.cancel()
            gathered.add_done_callback(lambda g: g.cancelled() or g.exception())
            if isinstance(exc, ServeError | asyncio.CancelledError):
                raise
            raise ServeError(500, "device", f"encoding failed: {exc}") from exc

    # ------------------------------------------------------------- shutdown

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.set(self.in_flight)

    def leave(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        if self.in_flight == 0:
            self._idle.set()

    def begin_drain(self) -> None:
        """Stop taking work: /ready and new requests answer 503; accepted ones finish. A
        start-up still under way goes no further."""
        with self._state_lock:
            self._stopping.set()
            if self.state != "failed":
                self.state = "draining"
        self.metrics.ready.set(0)
        log.info("draining: %d requests in flight", self.in_flight)

    def wait_drained(self, seconds: float) -> bool:
        """Block until every accepted request is answered (True) or `seconds` pass (False)."""
        return self._idle.wait(seconds)

    def stop(self) -> None:
        with self._state_lock:
            self._stopping.set()
            batcher = self.batcher
            if self.state != "failed":
                self.state = "stopped"
        if batcher is not None:
            batcher.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------- description

    def models(self) -> dict[str, Any]:
        """/v1/models: the OpenAI list, with what was served and how it was proven."""
        cfg = self.config
        first = self.encoders[0] if self.encoders else None
        about: dict[str, Any] = {
            "spec": cfg.model,
            "state": self.state,
            "devices": [str(e.device) for e in self.encoders] or list(cfg.device_list),
            "dtype": cfg.dtype,
            "fixes": list(cfg.fixes),
            "runtime": cfg.runtime,
            "outputs": self.output_shapes,
            "max_batch_size": self.batcher.max_batch if self.batcher else cfg.max_batch_size,
            "batch_size_from": self.batch_source,
            "max_wait_ms": cfg.max_wait_ms,
            "normalize": cfg.normalize,
            "api_key_required": bool(cfg.api_key),
            "self_check": self.check_summary(),
        }
        if first is not None:
            about |= {
                "family": first.family,
                "image_size": list(first.image_size),
                "weights_sha256": first.weights_sha256,
            }
        if self.auto_throughput is not None:
            about["auto_batch_images_per_second"] = round(self.auto_throughput, 2)
            about["auto_batch_measured"] = {
                str(b): round(v, 2) for b, v in self.auto_measured.items()
            }
        card = {
            "id": cfg.served_name,
            "object": "model",
            "created": self.started_at,
            "owned_by": "vitport",
            "vitport": about,
        }
        return {"object": "list", "data": [card]}

    def check_summary(self) -> dict[str, Any]:
        if not self.config.check:
            return {"checked": False, "reason": "--no-check"}
        if not self.checks:
            return {"checked": False, "reason": f"not yet ({self.state})"}
        from vitport.compare.sides import describe_side

        first = self.checks[0]
        note = {"reference_note": self.reference_note} if self.reference_note else {}
        return {
            **note,
            "checked": True,
            "passed": all(r.passed for r in self.checks),
            "reference": describe_side(first.reference),
            "inputs": len(first.inputs),
            "limits": [t.spec() for t in first.thresholds],
            "worst_rel_error": max(r.worst_rel_error for r in self.checks),
            "devices": [
                {
                    "device": r.candidate.device,
                    "passed": r.passed,
                    "worst_rel_error": r.worst_rel_error,
                    "failures": [
                        f"{c.group}.{c.metric}={c.value:.6g} (limit {c.limit:g})"
                        for c in r.verdict.failures
                    ],
                }
                for r in self.checks
            ],
        }


def check_line(result: Any) -> str:
    """One line for a self-check: verdict, sides, worst error, inputs."""
    from vitport.compare.sides import describe_side

    verdict = "passed" if result.passed else "FAILED"
    return (
        f"{verdict}: {describe_side(result.candidate)} vs {describe_side(result.reference)} on "
        f"{len(result.inputs)} inputs, worst relative error {100 * result.worst_rel_error:.3g}%"
    )
