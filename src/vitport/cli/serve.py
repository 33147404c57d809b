"""`vitport serve`: the ported encoder behind an HTTP endpoint, proven before it opens."""

from __future__ import annotations

from typing import Annotated

import typer

from vitport.cli.app import (
    CudaShimOpt,
    DeviceOpt,
    DtypeOpt,
    FixOpt,
    ImageSizeOpt,
    ModelOpt,
    RemoteCodeOpt,
    RuntimeOpt,
    WeightsOpt,
    errors,
)
from vitport.cli.inputs import enable_cuda_shim, port_options

Int = Annotated[int, typer.Option(min=1)]


def serve(
    model: ModelOpt,
    device: DeviceOpt = "auto",
    devices: Annotated[
        str | None,
        typer.Option(
            help="Several devices behind one queue, one worker each: npu:0,npu:1 "
            "or cuda:0,cuda:1 (with --engine ray: one replica each)."
        ),
    ] = None,
    dtype: DtypeOpt = None,
    fix: FixOpt = None,
    image_size: ImageSizeOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, metavar="PORT", help="Port to listen on.")
    ] = 8000,
    model_name: Annotated[
        str | None, typer.Option(help="The model id clients send; default: the spec.")
    ] = None,
    max_batch_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            metavar="N",
            help="Images per device batch; default: bench's auto size, measured at start-up "
            "(within 60 s).",
        ),
    ] = None,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            min=0.0, metavar="MS", help="How long a batch waits to fill after its first image."
        ),
    ] = 5.0,
    workers: Annotated[
        int, typer.Option(min=1, metavar="N", help="Threads that decode and preprocess.")
    ] = 2,
    max_queue: Annotated[
        int,
        typer.Option(
            min=1, metavar="N", help="Images queued at most; beyond it, 429 with Retry-After."
        ),
    ] = 1024,
    max_body_bytes: Annotated[
        int, typer.Option(min=1, metavar="BYTES", help="Largest request body; beyond it, 413.")
    ] = 64 << 20,
    max_images_per_request: Annotated[
        int, typer.Option(min=1, metavar="N", help="Most images in one request; beyond it, 413.")
    ] = 256,
    timeout: Annotated[
        float,
        typer.Option(
            min=0.001,
            metavar="SECONDS",
            help="Seconds a request may take; beyond it, 504 and its work is dropped.",
        ),
    ] = 60.0,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="VITPORT_API_KEY",
            show_envvar=False,
            metavar="KEY",
            help="Every /v1/* request must send Authorization: Bearer KEY, else 401 "
            "(/health, /ready and /metrics stay open); also read from VITPORT_API_KEY.",
        ),
    ] = None,
    no_normalize: Annotated[
        bool,
        typer.Option(
            "--no-normalize",
            help="Serve the encoder's raw vectors; by default each has unit L2 norm, as OpenAI's "
            "(compare them with a dot product). A request's own normalize field wins.",
        ),
    ] = False,
    allow_urls: Annotated[
        bool,
        typer.Option(
            "--allow-urls",
            help="Accept http(s) URLs as inputs (never to "
            "private, loopback or link-local addresses).",
        ),
    ] = False,
    reference: Annotated[
        str,
        typer.Option(
            "--reference",
            "-r",
            help="What the self-check compares with: a device "
            "(cpu, in fp32; in fp64 for a server that itself runs on the CPU in fp32), a golden "
            "file from vitport infer --out, or an msprobe dump "
            "(whose own inputs are then used), as in vitport compare.",
        ),
    ] = "cpu",
    no_check: Annotated[
        bool,
        typer.Option(
            "--no-check",
            help="Skip the self-check (a faster start; /v1/models "
            "then says the port is unchecked).",
        ),
    ] = False,
    threshold: Annotated[
        list[str] | None,
        typer.Option(
            "--threshold",
            "-t",
            help="Override a self-check limit, as in vitport compare (e.g. rel_error=2%).",
        ),
    ] = None,
    runtime: RuntimeOpt = "torch",
    inject_fault: Annotated[
        str | None,
        typer.Option(
            help="Plant a known fault KIND@BLOCK in the served model (gelu-tanh@7): the "
            "self-check must catch it."
        ),
    ] = None,
    drain_seconds: Annotated[
        float,
        typer.Option(
            min=0.0,
            metavar="SECONDS",
            help="On SIGTERM/SIGINT, how long accepted requests may take to finish.",
        ),
    ] = 30.0,
    engine: Annotated[
        str, typer.Option(help="local (uvicorn, this process) or ray (Ray Serve replicas).")
    ] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="--engine ray: join this cluster; default: start one here.")
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(min=1, metavar="N", help="--engine ray: replicas; default one per device."),
    ] = None,
    autoscale: Annotated[
        str | None,
        typer.Option(
            help="--engine ray: MIN:MAX replicas, autoscaled by Ray Serve on ongoing requests."
        ),
    ] = None,
    max_ongoing_requests: Annotated[
        int | None,
        typer.Option(
            min=1,
            metavar="N",
            help="--engine ray: Ray Serve's per-replica limit; default --max-queue.",
        ),
    ] = None,
    max_queued_requests: Annotated[
        int | None,
        typer.Option(
            min=1,
            metavar="N",
            help="--engine ray: requests Ray queues per caller before it answers 503.",
        ),
    ] = None,
    weights: WeightsOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    cuda_shim: CudaShimOpt = False,
) -> None:
    """Serve the encoder: OpenAI-shaped POST /v1/embeddings (base64 images or data: URIs in,
    float or base64 embeddings out; output pooled, cls, registers or patches), multipart POST
    /v1/embed (JSON, or an Arrow stream with Accept: application/vnd.apache.arrow.stream),
    GET /v1/models, /health, /ready and /metrics (Prometheus).

    Before it takes traffic, the served configuration is compared with a reference (the same
    model on the CPU in fp32, or fp64 for a CPU fp32 server, on the 10 default inputs, or
    --reference GOLDEN) under vitport
    compare's verdict and limits: a failure keeps /ready at 503 and exits 1 with the compare
    table (--no-check serves anyway). Requests from all clients are gathered into device
    batches (--max-batch-size, --max-wait-ms); the queue is bounded (429 when full). SIGTERM or
    SIGINT drains: /ready and new requests turn 503, every accepted request is answered, and the
    process exits 0. Embeddings have unit L2 norm unless --no-normalize; --api-key KEY (or
    VITPORT_API_KEY) makes every /v1/* request send it. Needs vitport[serve]
    (vitport[serve-ray] for --engine ray).
    """
    import logging

    from vitport.serve.checks import check_options, check_port, parse_autoscale
    from vitport.serve.config import ServeConfig, open_to_all

    settings, _ = port_options(model, dtype, fix, weights, show=True)
    config = ServeConfig(
        model=model,
        device=device,
        dtype=settings.dtype,
        image_size=image_size,
        devices=tuple(d.strip() for d in (devices or "").split(",") if d.strip()),
        fixes=settings.fixes,
        weights=str(weights) if weights else None,
        trust_remote_code=trust_remote_code,
        model_name=model_name or "",
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        workers=workers,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        max_images_per_request=max_images_per_request,
        timeout=timeout,
        allow_urls=allow_urls,
        reference=reference,
        check=not no_check,
        thresholds=tuple(threshold or ()),
        inject_fault=inject_fault,
        drain_seconds=drain_seconds,
        runtime=runtime,
        api_key=api_key or None,
        normalize=not no_normalize,
    )
    check_options(config, engine)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     vitport: %(message)s"))
    logger = logging.getLogger("vitport.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    exposed = open_to_all(host, config.api_key)
    if exposed:
        logger.warning(exposed)
    enable_cuda_shim(cuda_shim)
    if engine == "ray":
        from vitport.serve import ray_engine

        ray_engine.run(
            config,
            host,
            port,
            ray_address,
            replicas=replicas,
            autoscaling=parse_autoscale(autoscale),
            max_ongoing_requests=max_ongoing_requests,
            max_queued_requests=max_queued_requests,
        )
        return
    check_port(host, port)
    # the model spec, resolved (downloaded, or a demo built) before the server starts: a wrong
    # one is one line, never a server that says it runs and then stops
    from vitport.families.sources import resolve

    resolve(config.model, weights_given=config.weights is not None)
    from vitport.serve.server import serve as run_server
    from vitport.serve.service import CheckFailed, Service

    service = Service(config)
    server = run_server(service, host, port)
    if isinstance(service.error, CheckFailed):
        from vitport.cli.compare import render_compare

        for result in service.error.results:
            if not result.passed:
                render_compare(result)
        raise service.error
    if service.error is not None:
        raise service.error
    if server.drained is False:
        errors.print(
            f"[red]error:[/red] {service.in_flight} requests were still in flight "
            f"after --drain-seconds {drain_seconds:g}"
        )
        raise typer.Exit(1)
