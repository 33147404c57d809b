"""Run the app under uvicorn, draining on SIGTERM/SIGINT: /ready and new requests turn 503, every
accepted request is answered, then the process exits (0) within --drain-seconds."""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn

from vitport.serve.app import create_app
from vitport.serve.service import Service

log = logging.getLogger("vitport.serve")
CLOSE_S = 5.0  # uvicorn's own wait for idle connections once the drain is over


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM/SIGINT drains the service before it stops; a second one is
    uvicorn's own (forced) exit."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self.drained: bool | None = None  # None: no drain ran; False: it ran out of time

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.service.state == "draining" or self.should_exit:
            return super().handle_exit(sig, frame)
        self.service.begin_drain()
        threading.Thread(target=self._drain, name="vitport-drain", daemon=True).start()

    def _drain(self) -> None:
        seconds = self.service.config.drain_seconds
        self.drained = self.service.wait_drained(seconds)
        if not self.drained:
            log.warning(
                "drain: %d requests still in flight after %g s (--drain-seconds)",
                self.service.in_flight,
                seconds,
            )
        self.should_exit = True


def serve(
    service: Service, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> DrainingServer:
    """Serve until a signal has drained it or start-up failed; the server, for its outcome
    (service.error holds a start-up failure)."""
    app = create_app(service=service, background=True)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=CLOSE_S,
        access_log=False,
    )
    server = DrainingServer(config, service)
    service.on_failed = lambda: setattr(server, "should_exit", True)
    server.run()
    return server
