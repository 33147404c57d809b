"""Target: `vitport serve` at saturation reaches at least 90% of `vitport bench`'s model-only
throughput at the same batch size and dtype (the demo model in fp32 on the CPU), with p50/p99
latency at concurrency 1, 8 and 64, the same server unbatched (--max-batch-size 1: one request
per forward pass, as a naive endpoint runs), and the server's memory after 100 and after
10,000 requests.

Clients are asyncio + httpx in this process, sending one JPEG (the scikit-image photos) per
request as base64, asking for base64 embeddings (what the openai client does by default). The
load generator shares the machine's CPUs with the server; that is part of what is measured.

Writes its section of docs/benchmarks.md. Run: python benchmarks/serve_load.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from docs_section import write_section

import vitport
from vitport.bench.run import Window, bench_batch
from vitport.inputs import sample_images

MARK = "<!-- serve_load -->"
MODEL = "demo:dinov2-small"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def server(batch: int, log: Path):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vitport",
        "serve",
        "--model",
        MODEL,
        "--device",
        "cpu",
        "--port",
        str(port),
        "--max-batch-size",
        str(batch),
        "--max-queue",
        "4096",
    ]
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited {proc.returncode}: {log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            time.sleep(0.5)
        yield proc, url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


async def drive(url: str, bodies: list[dict], concurrency: int, requests: int) -> dict:
    """`requests` requests from `concurrency` clients; latencies in ms and images/s."""
    latencies: list[float] = []
    failures = 0
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one_client() -> None:
            nonlocal failures
            for k in counter:
                t0 = time.perf_counter()
                reply = await client.post("/v1/embeddings", json=bodies[k % len(bodies)])
                latencies.append(1000 * (time.perf_counter() - t0))
                failures += reply.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.array(latencies)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "failed": failures,
        "img_s": requests / wall,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--batch", type=int, default=8, help="the server's --max-batch-size")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    bodies = []
    for image in sample_images(8):
        buffer = io.BytesIO()
        image.image.save(buffer, format="JPEG", quality=90)
        bodies.append({"model": MODEL, "input": [base64.b64encode(buffer.getvalue()).decode()]})

    encoder = vitport.load(MODEL, "cpu", "fp32")
    model_only = bench_batch(encoder, args.batch, Window(min_seconds=10.0)).measurement
    bench_img_s = model_only.images_per_second
    del encoder
    counts = {1: int(60 * scale) or 10, 8: int(300 * scale) or 40, 64: int(1200 * scale) or 128}
    rows, naive_rows = [], []
    logs = Path(tempfile.mkdtemp(prefix="serve-load-"))
    with server(args.batch, logs / "batched.log") as (proc, url):
        warm = asyncio.run(drive(url, bodies, 8, 100))
        rss_100 = rss_mib(proc.pid)
        for concurrency, n in counts.items():
            rows.append(asyncio.run(drive(url, bodies, concurrency, n)))
        done = 100 + sum(counts.values())
        total = 10_000 if not args.quick else 1_000
        if done < total:
            asyncio.run(drive(url, bodies, 64, total - done))
        rss_total = rss_mib(proc.pid)
        assert warm["failed"] == 0
    with server(1, logs / "naive.log") as (_, url):
        asyncio.run(drive(url, bodies, 8, 20))
        for concurrency, n in counts.items():
            naive_rows.append(asyncio.run(drive(url, bodies, concurrency, n)))

    saturated = rows[-1]["img_s"]
    share = saturated / bench_img_s
    today = datetime.date.today().isoformat()
    lines = [
        f"## CPU: vitport serve under load vs the model alone ({today})",
        "",
        f"`python benchmarks/serve_load.py{' --quick' if args.quick else ''}`: {MODEL} fp32 on "
        f"{os.cpu_count()} CPU cores, server `--max-batch-size {args.batch}`, one JPEG per "
        "request as base64, base64 embeddings back; asyncio + httpx clients on the same machine.",
        "",
        f"Model only (`vitport bench`, batch {args.batch}): **{bench_img_s:.1f} img/s**. Served at "
        f"concurrency 64: **{saturated:.1f} img/s = {100 * share:.0f}%** of it (target >= 90%: "
        f"{'met' if share >= 0.9 else 'NOT met'}).",
        "",
        "| server | concurrency | requests | failed | img/s | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, group in (("batched", rows), ("unbatched (--max-batch-size 1)", naive_rows)):
        for r in group:
            lines.append(
                f"| {name} | {r['concurrency']} | {r['requests']} | {r['failed']} | "
                f"{r['img_s']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} |"
            )
    gain = saturated / naive_rows[-1]["img_s"]
    lines += [
        "",
        f"Batching buys {gain:.2f}x throughput at concurrency 64. Server memory (RSS): "
        f"{rss_100:.0f} MiB after 100 requests, {rss_total:.0f} MiB after {total:,} "
        f"({rss_total - rss_100:+.0f} MiB).",
    ]
    print(write_section(MARK, lines))


if __name__ == "__main__":
    main()
