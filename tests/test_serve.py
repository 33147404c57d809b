"""`vitport serve` as users run it: the real server in a subprocess on a free port, driven by
the official openai client and httpx."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow  # each test starts `vitport serve` (or CLI runs) in a subprocess
httpx = pytest.importorskip("httpx")

import vitport  # noqa: E402
from vitport.infer import infer  # noqa: E402
from vitport.inputs import LoadedImage, random_images, read_image_bytes  # noqa: E402

MODEL = "dinov2_with_registers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def output(self) -> str:
        return self.log.read_text()

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        lines = [line for line in text.splitlines() if line.startswith(name + " ")]
        return float(lines[0].split()[-1]) if lines else 0.0


def wait_ready(server: Server, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited {server.proc.returncode}:\n{server.output()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"server not ready after {timeout} s:\n{server.output()}")


def until(condition, timeout: float = 60) -> None:
    """Poll ``condition`` until it holds; fail only after a generous ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not so within {timeout} s"
        time.sleep(0.05)


@contextlib.contextmanager
def running(tmp_path: Path, model: str, *args: str, ready: bool = True):
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "vitport",
        "serve",
        "--model",
        model,
        "--device",
        "cpu",
        "--port",
        str(port),
        *args,
    ]
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=dict(os.environ))
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        if ready:
            wait_ready(server)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def expected(model_dir: Path, files: list[bytes]) -> dict[str, torch.Tensor]:
    """What vitport infer gives for the same bytes."""
    encoder = vitport.load(str(model_dir))
    images = [LoadedImage(f"i{k}", read_image_bytes(d, f"i{k}")) for k, d in enumerate(files)]
    return infer(encoder, images, batch_size=4).features.groups()


def cosines(a, b) -> torch.Tensor:
    a = torch.as_tensor(np.asarray(a), dtype=torch.float64).reshape(len(a), -1)
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64).reshape(len(b), -1)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


@pytest.fixture(scope="module")
def model_dir(tiny_dir) -> Path:
    return tiny_dir(MODEL)


@pytest.fixture(scope="module")
def files() -> list[bytes]:
    return [png(im.image.resize((40, 40))) for im in random_images(64, size=40, seed=7)]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running(
        tmp_path_factory.mktemp("serve"),
        str(model_dir),
        "--max-batch-size",
        "8",
        "--max-wait-ms",
        "20",
        "--max-body-bytes",
        "300000",
        "--max-images-per-request",
        "16",
    ) as server:
        yield server


def test_openai_client_in_both_encodings_matches_infer(server, model_dir, files):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    want = expected(model_dir, files[:4])
    inputs = [b64(files[0]), f"data:image/png;base64,{b64(files[1])}", b64(files[2]), b64(files[3])]
    default = client.embeddings.create(model=str(model_dir), input=inputs)  # base64 on the wire
    floats = client.embeddings.create(model=str(model_dir), input=inputs, encoding_format="float")
    for reply in (default, floats):
        assert [d.index for d in reply.data] == [0, 1, 2, 3] and reply.usage.prompt_tokens == 4
        assert cosines([d.embedding for d in reply.data], want["pooled"]).min() >= 0.9999
    for output in ("cls", "registers", "patches"):
        reply = client.embeddings.create(
            model=str(model_dir), input=inputs[:2], extra_body={"output": output}
        )
        assert cosines([d.embedding for d in reply.data], want[output][:2]).min() >= 0.9999
    one = client.embeddings.create(model=str(model_dir), input=inputs[0])
    assert len(one.data) == 1 and len(one.data[0].embedding) == want["pooled"].shape[1]


def test_models_lists_the_verdict_and_limits(server, model_dir):
    card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert card["id"] == str(model_dir) and card["object"] == "model"
    check = card["vitport"]["self_check"]
    # a CPU fp32 server against the CPU in fp32 would prove nothing: fp64 is its reference
    assert check["checked"] and check["passed"] and check["reference"] == "cpu fp64"
    assert check["inputs"] == 10 and "rel_error=0.01" in check["limits"]
    assert card["vitport"]["max_batch_size"] == 8
    assert card["vitport"]["outputs"]["registers"] == [4, 32]
    assert "self-check passed" in server.output()
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_multipart_json_and_arrow(server, model_dir, files):
    import pyarrow as pa

    want = expected(model_dir, files[:3])
    parts = [("file", (f"photo{k}.png", files[k], "image/png")) for k in range(3)]
    reply = httpx.post(f"{server.url}/v1/embed", files=parts, params={"outputs": "pooled,cls"})
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert [d["id"] for d in data] == ["photo0.png", "photo1.png", "photo2.png"]
    assert cosines([d["cls"] for d in data], want["cls"]).min() >= 0.9999
    arrow = httpx.post(
        f"{server.url}/v1/embed",
        files=parts,
        params={"outputs": "pooled,cls"},
        headers={"Accept": "application/vnd.apache.arrow.stream"},
    )
    assert arrow.headers["content-type"].startswith("application/vnd.apache.arrow.stream")
    table = pa.ipc.open_stream(arrow.content).read_all()
    assert table.column_names == ["id", "path", "width", "height", "pooled", "cls"]
    assert table.column("width").to_pylist() == [40, 40, 40]
    assert cosines(table.column("pooled").to_pylist(), want["pooled"]).min() >= 0.9999


def test_64_concurrent_clients_each_get_their_own(server, model_dir, files):
    want = expected(model_dir, files)["pooled"]
    before = server.metric("vitport_batch_size_count")

    def ask(k: int) -> list[float]:
        body = {"model": str(model_dir), "input": [b64(files[k])], "encoding_format": "float"}
        reply = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        return reply.json()["data"][0]["embedding"]

    with ThreadPoolExecutor(64) as pool:
        got = list(pool.map(ask, range(64)))
    sims = cosines(got, want)
    assert sims.min() >= 0.9999  # each client its own image's embedding
    neighbours = cosines(got, want.roll(1, 0))
    assert (neighbours < sims).all()  # never a neighbour's
    batches = server.metric("vitport_batch_size_count") - before
    assert batches < 64  # requests were gathered into shared batches


def bomb() -> bytes:
    """A PNG whose header claims 100000 x 100000 pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def test_every_bad_input_gets_its_4xx_while_good_requests_succeed(server, model_dir, files):
    photo = jpeg(random_images(1, size=64, seed=3)[0].image)
    bad = {
        "not-an-image": b64(b"hello, this is text"),
        "truncated": b64(photo[: len(photo) // 2]),
        "too-large": b64(bomb()),
        "bad-base64": "iVBORw0KGgo",  # base64's alphabet, cut short of its padding
        "plain-text": "this is %% not base64",
        "unsupported-format": "data:text/plain;base64," + b64(b"hi"),
        "url-not-allowed": "https://example.com/cat.jpg",
        "empty": "",
    }
    url = f"{server.url}/v1/embeddings"

    def good(k: int) -> int:
        body = {"model": str(model_dir), "input": [b64(files[k])]}
        return httpx.post(url, json=body, timeout=60).status_code

    def wrong(code: str) -> httpx.Response:
        body = {"model": str(model_dir), "input": [b64(files[0]), bad[code]]}
        return httpx.post(url, json=body, timeout=60)

    with ThreadPoolExecutor(16) as pool:
        goods = [pool.submit(good, k) for k in range(16)]
        replies = {code: pool.submit(wrong, code) for code in bad}
        assert [g.result() for g in goods] == [200] * 16
        for code, reply in replies.items():
            reply = reply.result()
            error = reply.json()["error"]
            assert reply.status_code == 400 and error["code"] == code, (code, reply.text)
            assert error["param"] == "input[1]" and error["message"].startswith("input[1]: ")
    assert server.proc.poll() is None

    def status(**kwargs) -> tuple[int, str]:
        reply = httpx.post(url, **kwargs)
        return reply.status_code, reply.json()["error"]["code"]

    assert status(json={"input": [b64(b"x" * 400_000)]}) == (413, "body-too-large")
    assert status(json={"input": [b64(files[0])] * 17}) == (413, "too-many-images")
    assert status(json={"model": "other", "input": [b64(files[0])]}) == (404, "model_not_found")
    assert status(json={"input": [b64(files[0])], "output": "logits"})[0] == 400
    assert status(json={"input": [1, 2, 3]}) == (400, "bad-input")
    assert status(content=b"{not json", headers={"content-type": "application/json"})[0] == 400
    assert status(json={"input": []}) == (400, "empty")
    assert server.metric('vitport_errors_total{reason="truncated"}') >= 1
    assert good(0) == 200


def test_full_queue_answers_429_with_retry_after(model_dir, tmp_path):
    big = [png(im.image) for im in random_images(8, size=512, seed=1)]
    with running(
        tmp_path,
        str(model_dir),
        "--max-queue",
        "8",
        "--max-batch-size",
        "8",
        "--max-wait-ms",
        "50",
        "--no-check",
    ) as server:

        def ask(_: int) -> httpx.Response:
            body = {"input": [b64(d) for d in big]}
            return httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60)

        with ThreadPoolExecutor(24) as pool:
            replies = list(pool.map(ask, range(24)))
        codes = sorted({r.status_code for r in replies})
        assert codes == [200, 429], codes
        full = next(r for r in replies if r.status_code == 429)
        assert (
            int(full.headers["retry-after"]) >= 1 and full.json()["error"]["code"] == "queue-full"
        )
        too_many = httpx.post(f"{server.url}/v1/embeddings", json={"input": [b64(big[0])] * 9})
        assert too_many.status_code == 413  # could never fit: not a retry
        assert (
            server.metric('vitport_requests_total{endpoint="/v1/embeddings",outcome="queue_full"}')
            >= 1
        )


def test_sigterm_under_load_answers_every_accepted_request(model_dir, files, tmp_path):
    want = expected(model_dir, files[:24])["pooled"]
    # the batcher holds the 24 requests for 4 s (room for a busy machine to send them all)
    with running(
        tmp_path, str(model_dir), "--max-batch-size", "64", "--max-wait-ms", "4000", "--no-check"
    ) as server:
        url = f"{server.url}/v1/embeddings"

        def ask(k: int) -> tuple[int, list[float] | None]:
            body = {"input": [b64(files[k])], "encoding_format": "float"}
            reply = httpx.post(url, json=body, timeout=60)
            ok = reply.status_code == 200
            return reply.status_code, reply.json()["data"][0]["embedding"] if ok else None

        with ThreadPoolExecutor(24) as pool:
            accepted = [pool.submit(ask, k) for k in range(24)]
            until(lambda: server.metric("vitport_requests_in_flight") >= 24)
            assert server.metric("vitport_requests_in_flight") == 24  # all held by the batcher
            server.proc.send_signal(signal.SIGTERM)
            until(lambda: httpx.get(f"{server.url}/ready").status_code == 503)
            late = httpx.post(url, json={"input": [b64(files[0])]})
            assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
            results = [f.result() for f in accepted]
        assert [code for code, _ in results] == [200] * 24
        assert cosines([e for _, e in results], want).min() >= 0.9999
        assert server.proc.wait(30) == 0, server.output()


def test_timeout_and_a_gone_client_leave_no_work(model_dir, files, tmp_path):
    with running(
        tmp_path,
        str(model_dir),
        "--max-batch-size",
        "64",
        "--max-wait-ms",
        "1500",
        "--timeout",
        "0.3",
        "--no-check",
    ) as server:
        url = f"{server.url}/v1/embeddings"
        reply = httpx.post(url, json={"input": [b64(files[0])]})
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"
        time.sleep(1.6)
        assert server.metric("vitport_batch_size_count") == 0  # its work was dropped
    with running(
        tmp_path, str(model_dir), "--max-batch-size", "64", "--max-wait-ms", "5000", "--no-check"
    ) as server:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server.url}/v1/embeddings", json={"input": [b64(files[0])]}, timeout=0.2)
        until(lambda: server.metric('vitport_errors_total{reason="disconnected"}') >= 1)
        assert server.metric('vitport_errors_total{reason="disconnected"}') == 1
        # a later image, in the gone client's batch or after it, is the only one encoded
        later = httpx.post(
            f"{server.url}/v1/embeddings", json={"input": [b64(files[1])]}, timeout=60
        )
        assert later.status_code == 200
        assert server.metric("vitport_batch_size_count") == 1
        assert server.metric("vitport_batch_size_sum") == 1
        assert server.metric("vitport_queue_depth") == 0


def test_failing_self_check_stays_not_ready_and_exits_1(model_dir, tmp_path):
    # a tiny random model's planted fault is small: a tight limit makes it fail for sure
    with running(
        tmp_path,
        str(model_dir),
        "--inject-fault",
        "gelu-tanh@1",
        "-t",
        "rel_error=1e-6",
        ready=False,
    ) as server:
        seen = set()
        deadline = time.monotonic() + 180
        while server.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                seen.add(httpx.get(f"{server.url}/ready", timeout=2).status_code)
            time.sleep(0.1)
        assert server.proc.returncode == 1, server.output()
        assert 200 not in seen
        output = server.output()
        assert "self-check failed: cls.rel_error beyond its limit" in output
        assert "FAIL  cls.rel_error" in output and "rel err" in output  # the compare table


def test_urls_need_allow_urls_and_never_reach_private_addresses(model_dir, files, tmp_path):
    from vitport.serve.inputs import blocked_address

    for host in ("127.0.0.1", "localhost", "10.1.2.3", "169.254.169.254", "::1", "192.168.0.9"):
        assert blocked_address(host), host
    with running(tmp_path, str(model_dir), "--allow-urls", "--no-check") as server:
        for target in (
            "http://127.0.0.1:9/x.png",
            "http://169.254.169.254/latest",
            f"{server.url}/metrics",
        ):
            reply = httpx.post(f"{server.url}/v1/embeddings", json={"input": [target]})
            assert reply.status_code == 400 and reply.json()["error"]["code"] == "url-not-allowed"
            assert "non-public address" in reply.json()["error"]["message"]


def test_bad_options_are_one_line_before_the_model_loads(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "vitport", "serve", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = {
        ("--model", "demo:dinov2-small", "--device", "tpu"): "unknown device",
        ("--model", "x", "--fix", "nonsense"): "fix",
        ("--model", "x", "--reference", "missing/golden.safetensors"): "not found",
        ("--model", "x", "--device", "cpu", "--port", str(busy.getsockname()[1])): "cannot listen",
        ("--model", "x", "--engine", "spark"): "--engine",
        # the spec is resolved before uvicorn starts: no "Uvicorn running on" first
        ("--model", "demo:dinov2-huge", "--device", "cpu", "--port", "0"): "unknown demo model",
    }
    for args, words in cases.items():
        done = run(*args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in done.stderr, args
    busy.close()


@pytest.mark.slow
def test_ray_serve_deployment_gives_the_same_embeddings(
    model_dir, files, tmp_path, one_ray_at_a_time
):
    pytest.importorskip("ray.serve")
    want = expected(model_dir, files[:3])["pooled"]
    with running(tmp_path, str(model_dir), "--engine", "ray", "--max-batch-size", "4") as server:
        body = {
            "model": str(model_dir),
            "input": [b64(f) for f in files[:3]],
            "encoding_format": "float",
        }
        reply = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        got = [d["embedding"] for d in reply.json()["data"]]
        assert cosines(got, want).min() >= 0.9999
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["vitport"]["self_check"][
            "passed"
        ]
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(120) == 0, server.output()


def test_golden_reference_and_two_device_workers(model_dir, files, tmp_path, tiny_dir):
    golden = tmp_path / "gpu.safetensors"
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitport",
            "infer",
            "--model",
            str(model_dir),
            "--device",
            "cpu",
            "--out",
            str(golden),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    want = expected(model_dir, files[:8])["pooled"]
    with running(
        tmp_path,
        str(model_dir),
        "--reference",
        str(golden),
        "--devices",
        "cpu,cpu",
        "--max-batch-size",
        "2",
    ) as server:
        about = httpx.get(f"{server.url}/v1/models").json()["data"][0]["vitport"]
        assert about["devices"] == ["cpu", "cpu"]
        assert about["self_check"]["passed"] and "golden file" in about["self_check"]["reference"]
        assert len(about["self_check"]["devices"]) == 2  # each device checked

        def ask(k: int) -> list[float]:
            body = {"input": [b64(files[k])], "encoding_format": "float"}
            return httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60).json()["data"][
                0
            ]["embedding"]

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, range(8)))
        assert cosines(got, want).min() >= 0.9999
    other = tiny_dir("dinov2")  # another model's golden file: refused in one line, exit 2
    with running(tmp_path, str(other), "--reference", str(golden), ready=False) as server:
        assert server.proc.wait(120) == 2, server.output()
        assert "error:" in server.output()


def test_serve_runs_another_runtime(model_dir, files, tmp_path):
    """--runtime onnxruntime: the self-check judges the runtime itself, and it serves."""
    from vitport.runtimes import runner

    if runner("onnxruntime").missing():
        pytest.skip(runner("onnxruntime").missing())
    want = expected(model_dir, files[:4])["pooled"]
    with running(
        tmp_path, str(model_dir), "--runtime", "onnxruntime", "--max-batch-size", "4"
    ) as server:
        about = httpx.get(f"{server.url}/v1/models").json()["data"][0]["vitport"]
        assert about["runtime"] == "onnxruntime" and about["self_check"]["passed"]
        body = {"input": [b64(f) for f in files[:4]], "encoding_format": "float"}
        got = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60).json()["data"]
        assert cosines([g["embedding"] for g in got], want).min() >= 0.9999
