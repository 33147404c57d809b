"""`vitport serve`: the ported encoder behind an endpoint that proves itself faithful before it
takes traffic (OpenAI-shaped /v1/embeddings, multipart /v1/embed, Prometheus /metrics), with
dynamic batching, bounded queues and a drain that loses no request. Needs `vitport[serve]`."""

from __future__ import annotations

from typing import Any

from vitport.serve.config import OUTPUTS, ServeConfig

__all__ = ["OUTPUTS", "ServeConfig", "create_app"]


def create_app(config: ServeConfig, **options: Any) -> Any:
    """The ASGI app (FastAPI) serving `config`; see vitport.serve.app.create_app."""
    from vitport.serve.app import create_app as build

    return build(config, **options)
