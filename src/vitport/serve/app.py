"""The ASGI app: OpenAI-shaped /v1/embeddings, multipart /v1/embed (JSON or Arrow), models,
health, readiness and metrics, over one Service."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from vitport.serve.config import ServeConfig
from vitport.serve.inputs import entry_bytes
from vitport.serve.metrics import CONTENT_TYPE
from vitport.serve.service import Embedded, Entry, ServeError, Service

log = logging.getLogger("vitport.serve")
ARROW_STREAM = "application/vnd.apache.arrow.stream"
ROUTES = "POST /v1/embeddings, POST /v1/embed, GET /v1/models, GET /health, /ready and /metrics"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    405: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed",
    503: "service_unavailable",
    504: "timeout",
}


class EmbeddingRequest(BaseModel):
    """The OpenAI embeddings request; `output` picks the Features group and `normalize`
    overrides the server's default (vitport's own). `input` is checked by `request_inputs`,
    which says what is wrong with an entry in words, not pydantic's. A missing `model` means
    the served one (as vLLM and text-embeddings-inference take it)."""

    model_config = ConfigDict(extra="ignore")

    input: Any
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    output: str = "pooled"
    dimensions: int | None = None
    user: str | None = None
    normalize: bool | None = None


IMAGE_EXPECTED = "send each image as a base64 string or a data:image/...;base64, URI"


def request_inputs(value: Any) -> list[str]:
    """The request's `input` as a list of strings; ServeError naming the entry that is not one
    (token ids and nested arrays are for text models: this server embeds images)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ServeError(
            400, "bad-input", f"input is {json_kind(value)}; {IMAGE_EXPECTED}", param="input"
        )
    for k, item in enumerate(value):
        if not isinstance(item, str):
            what = json_kind(item)
            if isinstance(item, list | int | float):
                what += " (token ids are for text models; this server embeds images)"
            raise ServeError(
                400, "bad-input", f"input[{k}] is {what}; {IMAGE_EXPECTED}", param=f"input[{k}]"
            )
    return value


def json_kind(value: Any) -> str:
    """What a JSON value is, in words."""
    if isinstance(value, list):
        return "a nested array" if value else "an empty array"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else type(value).__name__


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for a body over the limit, by Content-Length or as it streams in."""

    def __init__(self, app: Any, limit: int, on_reject: Any) -> None:
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._reject(scope, receive, send)
        seen = 0
        started = False

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except BodyTooLarge:
            if not started:
                await self._reject(scope, receive, send)

    async def _reject(self, scope: dict, receive: Any, send: Any) -> None:
        self.on_reject()
        error = ServeError(
            413,
            "body-too-large",
            f"request body over {self.limit} bytes "
            "(--max-body-bytes); send fewer or smaller images",
        )
        await error_response(error)(scope, receive, send)


class RequireKey:
    """401 in OpenAI's shape for a /v1/* request without `Authorization: Bearer KEY`; the
    probes (/health, /ready, /metrics) stay open."""

    def __init__(self, app: Any, key: str, on_reject: Any) -> None:
        self.app, self.key, self.on_reject = app, key.encode(), on_reject

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/v1" or path.startswith("/v1/")):
            return await self.app(scope, receive, send)
        sent = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = sent.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        self.on_reject(path)
        if not sent:
            message = "no API key: this server needs the header Authorization: Bearer KEY"
        else:
            message = "wrong API key: send the key the server was started with as Bearer KEY"
        error = ServeError(401, "invalid_api_key", message, headers={"WWW-Authenticate": "Bearer"})
        await error_response(error)(scope, receive, send)


def error_response(error: ServeError) -> JSONResponse:
    body: dict[str, Any] = {
        "message": error.message,
        "type": ERROR_TYPES.get(error.status, "error"),
        "param": error.param,
        "code": error.code,
    }
    if error.entries:
        body["entries"] = error.entries
    return JSONResponse({"error": body}, status_code=error.status, headers=error.headers)


def create_app(
    config: ServeConfig | None = None,
    *,
    service: Service | None = None,
    background: bool = True,
    capacity: Callable[[], dict[str, Any]] | None = None,
) -> FastAPI:
    """The vitport serving app, to run with uvicorn or mount in another ASGI app.

    The model loads, is self-checked and warmed up at start-up (the app's lifespan): in a
    thread while /health already answers and /ready says 503 (`background`), or before the
    app takes any request (``background=False``, as Ray Serve replicas do). `capacity` says
    how much of a deployment serves (Ray Serve's replicas): /health and /ready carry it, and
    /health says "degraded" while replicas are missing."""
    if service is None:
        if config is None:
            raise ValueError("create_app needs a ServeConfig or a Service")
        service = Service(config)
    cfg = service.config

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        starting = loop.run_in_executor(None, service.start)
        if not background:
            await starting
        else:
            starting.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="vitport", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_middleware(
        BodyLimit, limit=cfg.max_body_bytes, on_reject=lambda: count(service, "any", "too-large")
    )
    if cfg.api_key:  # added last: the outermost, so a request without the key is read no further
        app.add_middleware(
            RequireKey,
            key=cfg.api_key,
            on_reject=lambda path: count(service, endpoint_label(path), "unauthorized"),
        )

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own errors (an unknown path, a wrong method) in OpenAI's shape."""
        what = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            error = ServeError(
                404, "not-found", f"no such endpoint: {what}; this server answers {ROUTES}"
            )
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            error = ServeError(
                405,
                "method-not-allowed",
                f"{what} is not allowed; use {allowed or 'another method'}",
                headers=dict(exc.headers or {}),
            )
        else:
            error = ServeError(exc.status_code, "http-error", f"{what}: {exc.detail}")
        count(service, endpoint_label(request.url.path), OUTCOMES.get(error.status, "error"))
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        count(service, endpoint_label(request.url.path), "bad_request")
        return error_response(validation_error(exc))

    async def deployment() -> dict[str, Any]:
        return await asyncio.to_thread(capacity) if capacity else {}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        replicas = await deployment()
        status = "degraded" if replicas.get("degraded") else "ok"
        return {"status": status, "state": service.state, **replicas}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if service.ready:
            return JSONResponse({"status": "ready", **await deployment()})
        detail = str(service.error) if service.error else service.state
        return JSONResponse({"status": service.state, "detail": detail}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return service.models()

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
        async with serving(service, "/v1/embeddings"):
            texts = request_inputs(body.input)
            if body.model not in (None, "", cfg.served_name):
                raise ServeError(
                    404,
                    "model_not_found",
                    f"model {body.model!r} is not served "
                    f"here; this server serves {cfg.served_name!r}",
                    param="model",
                )
            if body.dimensions is not None:
                raise ServeError(
                    400,
                    "bad-dimensions",
                    "dimensions is not supported: the encoder's width is fixed",
                    param="dimensions",
                )
            service.check_output(body.output)
            entries = [Entry(f"input[{k}]", reader(t, cfg)) for k, t in enumerate(texts)]
            done = await service.embed(entries, "input", request.is_disconnected)
            unit = cfg.normalize if body.normalize is None else body.normalize
            data = [
                {
                    "object": "embedding",
                    "index": k,
                    **embedding(e, body.output, body.encoding_format, unit),
                }
                for k, e in enumerate(done)
            ]
            return {
                "object": "list",
                "data": data,
                "model": cfg.served_name,
                "usage": {
                    "prompt_tokens": len(done),
                    "total_tokens": len(done),
                    "images": len(done),
                },
            }

    @app.post("/v1/embed")
    async def embed(
        request: Request, outputs: str = "pooled", normalize: bool | None = None
    ) -> Response:
        async with serving(service, "/v1/embed"):
            names = [n.strip() for n in outputs.split(",") if n.strip()]
            for name in names:
                service.check_output(name)
            entries = await form_entries(request, cfg)
            done = await service.embed(entries, "file", request.is_disconnected)
            if cfg.normalize if normalize is None else normalize:
                done = [Embedded(unit_norm({n: e.outputs[n] for n in names}), e.size) for e in done]
            ids = [e.name for e in entries]
            if ARROW_STREAM in request.headers.get("accept", ""):
                return Response(
                    arrow_stream(ids, done, names, service.output_shapes), media_type=ARROW_STREAM
                )
            data = [
                {
                    "index": k,
                    "id": ids[k],
                    "width": e.size[0],
                    "height": e.size[1],
                    **{n: e.outputs[n].reshape(-1).tolist() for n in names},
                }
                for k, e in enumerate(done)
            ]
            shapes = {n: service.output_shapes[n] for n in names}
            return JSONResponse(
                {
                    "object": "list",
                    "model": cfg.served_name,
                    "data": data,
                    "shapes": shapes,
                    "usage": {"images": len(done)},
                }
            )

    return app


def count(service: Service, endpoint: str, outcome: str) -> None:
    service.metrics.requests.labels(endpoint, outcome).inc()


def endpoint_label(path: str) -> str:
    """The metrics label of a path: a served one, or "unknown" (no label per made-up path)."""
    known = ("/v1/embeddings", "/v1/embed", "/v1/models", "/health", "/ready", "/metrics")
    return path if path in known else "unknown"


def validation_error(exc: RequestValidationError) -> ServeError:
    """FastAPI's validation error as one line a client can act on."""
    first = exc.errors()[0] if exc.errors() else {}
    kind = first.get("type", "")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return ServeError(
            400,
            "invalid-json",
            f"the body is not valid JSON{f' ({reason})' if reason else ''}; send a JSON object "
            'such as {"model": "...", "input": ["<base64 image>"]}',
        )
    if not loc or (kind in ("model_attributes_type", "dict_type") and len(loc) <= 1):
        return ServeError(
            400,
            "bad-request",
            'the body must be a JSON object such as {"model": "...", "input": ["<base64 image>"]}',
        )
    where = ".".join(loc)
    if kind == "missing":
        hint = f"; {IMAGE_EXPECTED}" if where == "input" else ""
        return ServeError(400, "bad-request", f"{where} is required{hint}", param=where)
    message = f"{where}: {first.get('msg', 'invalid value')}"
    return ServeError(400, "bad-request", message, param=where)


OUTCOMES = {
    400: "bad_request",
    401: "unauthorized",
    404: "bad_request",
    405: "bad_request",
    413: "too_large",
    429: "queue_full",
    499: "disconnected",
    503: "unavailable",
    504: "timeout",
}


@contextlib.asynccontextmanager
async def serving(service: Service, endpoint: str):
    """One request: refused unless ready, counted in flight (draining waits for it), and its
    outcome counted."""
    try:
        service.gate()
    except ServeError:
        count(service, endpoint, "unavailable")
        raise
    service.enter()
    try:
        yield
        count(service, endpoint, "ok")
    except ServeError as exc:
        count(service, endpoint, OUTCOMES.get(exc.status, "error"))
        raise
    except BaseException:
        count(service, endpoint, "error")
        raise
    finally:
        service.leave()


def reader(text: Any, cfg: ServeConfig):
    return lambda: entry_bytes(text, cfg.allow_urls, cfg.max_body_bytes)


async def form_entries(request: Request, cfg: ServeConfig) -> list[Entry]:
    """The multipart parts that carry files, as entries named by their file names."""
    limit = cfg.max_images_per_request
    if "multipart/form-data" not in request.headers.get("content-type", ""):
        raise ServeError(
            400,
            "bad-request",
            "send the images as multipart/form-data file parts (curl -F file=@photo.jpg)",
        )
    try:
        form = await request.form(
            max_files=limit + 1, max_fields=limit + 16, max_part_size=cfg.max_body_bytes
        )
    except BodyTooLarge:
        raise
    except Exception as exc:  # starlette's MultiPartException / HTTPException
        detail = getattr(exc, "detail", None) or str(exc)
        status = 413 if "Too many files" in str(detail) else 400
        raise ServeError(status, "bad-multipart", f"cannot read the form: {detail}") from exc
    entries = []
    for field, value in form.multi_items():
        if isinstance(value, str):
            continue
        data = await value.read()
        entries.append(Entry(value.filename or field, lambda data=data: data))
    return entries


def unit_norm(outputs: dict[str, Any]) -> dict[str, Any]:
    """Each vector (the last axis: pooled, and every token of cls, registers, patches) scaled
    to unit L2 norm; a zero vector stays zero."""
    return {
        k: torch.nn.functional.normalize(v.double(), dim=-1).float() for k, v in outputs.items()
    }


def embedding(
    done: Embedded, output: str, encoding: str, normalize: bool = False
) -> dict[str, Any]:
    """One reply item: the embedding (flat, float or base64 little-endian float32) and, for
    token groups (cls, registers, patches), its `shape` to unflatten it."""
    tensor = done.outputs[output]
    if normalize:
        tensor = unit_norm({output: tensor})[output]
    values = tensor.numpy().astype("<f4", copy=False)
    flat = values.reshape(-1)
    item: dict[str, Any] = {}
    if encoding == "base64":
        item["embedding"] = base64.b64encode(flat.tobytes()).decode("ascii")
    else:
        item["embedding"] = flat.tolist()
    if values.ndim > 1:
        item["shape"] = list(values.shape)
    return item


def arrow_stream(
    ids: list[str], done: list[Embedded], names: list[str], shapes: dict[str, list[int]]
) -> bytes:
    """An Arrow IPC stream with embed's Parquet columns (id, path, width, height, outputs)."""
    import pyarrow as pa

    from vitport.embed.store import ShardRows, rows_table

    rows = ShardRows(
        0,
        ids=list(ids),
        paths=list(ids),
        sizes=[e.size for e in done],
        outputs={n: [e.outputs[n].numpy() for e in done] for n in names},
    )
    table = rows_table(rows, {n: shapes[n] for n in names})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


__all__ = ["ARROW_STREAM", "EmbeddingRequest", "create_app", "np"]
