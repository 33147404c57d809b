"""embed --engine ray on a real multi-node Ray cluster (tests/raycluster.py) that loses a node
mid-run: the run finishes on its own with every input exactly once, or ends in one line, and
never hangs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vitport.embed import embed, read
from vitport.errors import ClusterError

pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'vitport[ray]'")
pytestmark = pytest.mark.usefixtures("one_ray_at_a_time")

from raycluster import Cluster, free_port  # noqa: E402

MODEL = "demo:dinov2-small"  # a real ViT-S/14: slow enough on a CPU to be killed mid-run
IMAGES = 64
SHARD = 8


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    from vitport.inputs import sample_images

    directory = tmp_path_factory.mktemp("collection")
    images = sample_images(8)
    for k in range(IMAGES):
        im = images[k % len(images)].image.rotate(k * 7)  # 64 different images
        im.save(directory / f"{k:03d}.jpg", quality=90)
    return directory


@pytest.fixture(scope="module")
def local(collection, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("local") / "out"
    embed([str(collection)], MODEL, out, device="cpu", batch_size=4, shard_size=SHARD)
    return read(out, arrays=True)


def embed_and_kill(cluster: Cluster, collection: Path, out: Path, *args: str):
    """`vitport embed --engine ray` as a user runs it; once the first shard is written, SIGKILL
    the raylet of the node that holds the model actor."""
    cmd = [
        sys.executable,
        "-m",
        "vitport",
        "embed",
        str(collection),
        "--model",
        MODEL,
        "--device",
        "cpu",
        "--engine",
        "ray",
        "--ray-address",
        cluster.address,
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--shard-size",
        str(SHARD),
        "--quiet",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "part-00000.parquet").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no shard written in 300 s"
            time.sleep(0.1)
        node = cluster.node_holding("MapBatches(Encode)")
        written = len(list(out.glob("part-*.parquet")))
        node.kill()
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert written < IMAGES // SHARD, "the run ended before the node was killed"
    return proc.returncode, output


def check_exactly_once(out: Path, local: dict) -> None:
    got = read(out, arrays=True)
    assert len(got["id"]) == IMAGES and len(set(got["id"])) == IMAGES
    assert got["id"] == local["id"]
    for name in ("cls", "pooled"):
        np.testing.assert_allclose(got[name], local[name], atol=1e-4)


@pytest.mark.slow
def test_a_killed_node_does_not_stop_the_run(collection, local, tmp_path):
    """One CPU per node, the hardest case: the model actor restarts on the surviving node, its
    batches are retried, and reading tasks still find a CPU beside it (with Ray's default
    requests they wait for it forever); every input once, the features those of a local run."""
    cluster = Cluster([1, 1]).start()
    try:
        out = tmp_path / "out"
        code, output = embed_and_kill(cluster, collection, out, "--stall-timeout", "120")
    finally:
        cluster.stop()
    assert code == 0, output
    assert "Ray lost node" in output and "started again" in output, output
    assert "0.5 CPU each" in output, output
    check_exactly_once(out, local)


@pytest.mark.slow
def test_no_progress_ends_in_one_line_and_keeps_the_shards(collection, tmp_path):
    """A cluster with no CPU for anything: the run says what waits for what, in one line, and
    exits 1 within the stall timeout; shards already written stay and the run resumes."""
    import ray

    out = tmp_path / "out"
    embed([str(collection)], MODEL, out, device="cpu", batch_size=4, shard_size=SHARD)
    for extra in sorted(out.glob("part-*.parquet"))[2:]:  # as if stopped after two shards
        extra.unlink()
    ray.init(num_cpus=0, include_dashboard=False, log_to_driver=False)
    try:
        start = time.monotonic()
        with pytest.raises(ClusterError) as caught:
            embed(
                [str(collection)],
                MODEL,
                out,
                device="cpu",
                batch_size=4,
                shard_size=SHARD,
                engine="ray",
                stall_timeout=8,
            )
        seconds = time.monotonic() - start
    finally:
        ray.shutdown()
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code == 1
    assert "no progress for 8 s" in message and "waiting for 1 CPU each" in message, message
    assert "the cluster has no CPU" in message and "2 shard(s)" in message, message
    assert "run the same command again" in message
    assert seconds < 8 + 300  # ended, not hung: a generous bound for a busy machine
    assert len(read(out)) == 2 * SHARD
    resumed = embed([str(collection)], MODEL, out, device="cpu", batch_size=4, shard_size=SHARD)
    assert resumed.complete and resumed.skipped_done == 2 * SHARD


def test_cpu_shares_leave_room_for_a_reading_task():
    from vitport.embed.ray_engine import cpu_shares

    def node(cpus: float, alive: bool = True, **extra: float) -> dict:
        return {"Alive": alive, "Resources": {"CPU": cpus, **extra}}

    assert cpu_shares([node(0), node(2), node(4)], None) == 1.0
    assert cpu_shares([node(0), node(1), node(1)], None) == 0.5  # actor 0.5 + a read 0.5
    assert cpu_shares([node(1, alive=False), node(4)], None) == 1.0
    # eight NPU actors on a node of 8 CPUs: each 8/9 CPU, so one read still fits beside them
    share = cpu_shares([node(8, NPU=8), node(4)], "NPU")
    assert 8 * share + share <= 8 and share == pytest.approx(8 / 9)
    assert cpu_shares([node(16, GPU=8)], "GPU") == 1.0


def test_stall_timeout_is_for_the_ray_engine(collection, tmp_path):
    from vitport.errors import VitportError

    with pytest.raises(VitportError, match="stall_timeout=10: .* with engine='ray'"):
        embed([str(collection)], MODEL, tmp_path / "o", device="cpu", stall_timeout=10)
    with pytest.raises(VitportError, match="above 0"):
        embed([str(collection)], MODEL, tmp_path / "o", device="cpu", engine="ray", stall_timeout=0)


@pytest.mark.slow
def test_serve_replaces_a_replica_lost_with_its_node(tiny_dir, tmp_path):
    """`serve --engine ray` with two replicas: SIGKILL the node of one while clients ask. Every
    request is answered (200, or an error status), none hangs; /health says degraded until Ray
    Serve has replaced the replica, then ok with both running and serving the same vectors."""
    pytest.importorskip("ray.serve")
    import base64
    import io
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from PIL import Image

    model = tiny_dir("dinov2")
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 40, 90)).save(buffer, format="PNG")
    body = {"input": [base64.b64encode(buffer.getvalue()).decode()], "encoding_format": "float"}
    cluster = Cluster([2, 2]).start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vitport",
            "serve",
            "--model",
            str(model),
            "--device",
            "cpu",
            "--engine",
            "ray",
            "--ray-address",
            cluster.address,
            "--replicas",
            "2",
            "--port",
            str(port),
        ],
        env=cluster.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def output() -> str:
        return (tmp_path / "serve.log").read_text()[-3000:]

    def health() -> dict:
        try:
            return httpx.get(f"{url}/health", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def until(what, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not what():
            assert server.poll() is None, output()
            assert time.monotonic() < deadline, output()
            time.sleep(0.5)

    try:
        # the deployment may still say UPDATING for a moment after both replicas run
        until(lambda: health().get("replicas_running") == 2 and health()["status"] == "ok", 300)
        assert health()["replicas_wanted"] == 2
        want = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60).json()
        want = np.asarray(want["data"][0]["embedding"])

        def ask(_: int) -> int:
            return httpx.post(f"{url}/v1/embeddings", json=body, timeout=150).status_code

        with ThreadPoolExecutor(4) as pool:
            asked = [pool.submit(ask, k) for k in range(40)]
            time.sleep(0.5)
            cluster.node_holding("ServeReplica:vitport").kill()
            codes = [a.result() for a in asked]  # a hung request would raise a timeout here
        assert codes.count(200) >= len(codes) // 2, codes
        assert all(c == 200 or c >= 500 for c in codes), codes
        until(lambda: health().get("status") == "degraded", 60)
        until(lambda: health().get("replicas_running") == 2 and health()["status"] == "ok", 300)
        got = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60).json()
        np.testing.assert_allclose(got["data"][0]["embedding"], want, atol=1e-5)
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        cluster.stop()
        log.close()


@pytest.mark.slow
def test_when_ray_gives_up_the_line_says_so_and_the_shards_stay(collection, tmp_path, monkeypatch):
    """An actor Ray will not restart: exit 1, one line naming what was lost, shards kept."""
    import ray

    from vitport.embed import ray_engine

    out = tmp_path / "out"
    embed([str(collection)], MODEL, out, device="cpu", batch_size=4, shard_size=SHARD)
    for extra in sorted(out.glob("part-*.parquet"))[1:]:
        extra.unlink()

    class Lost:
        def iter_batches(self, **_):
            raise ray.exceptions.ActorDiedError()
            yield

    monkeypatch.setattr(ray_engine, "_pipeline", lambda *a, **k: Lost())
    monkeypatch.setattr(ray_engine, "NODE_DEATH_WAIT", 0)
    with pytest.raises(ClusterError) as caught:
        embed(
            [str(collection)],
            MODEL,
            out,
            device="cpu",
            batch_size=4,
            shard_size=SHARD,
            engine="ray",
        )
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code == 1
    assert message.startswith("Ray lost a worker and gave up (ActorDiedError"), message
    assert "the 1 shard(s) written" in message and "run the same command again" in message
    assert len(read(out)) == SHARD
