"""`vitport serve`'s app in this process (FastAPI's TestClient, the official openai client on
top of it): API keys, normalised embeddings, errors in OpenAI's shape, and the start-up (the
batch-size sweep on an injected clock, the self-check's reference, a stop before ready)."""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from fastapi.testclient import TestClient  # noqa: E402

import vitport  # noqa: E402
from vitport.errors import OutOfMemoryError  # noqa: E402
from vitport.infer import infer  # noqa: E402
from vitport.inputs import LoadedImage, random_images, read_image_bytes  # noqa: E402
from vitport.serve import ServeConfig, create_app  # noqa: E402
from vitport.serve.config import open_to_all  # noqa: E402
from vitport.serve.service import Service  # noqa: E402

MODEL = "dinov2_with_registers"
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def model(tiny_dir) -> str:
    return str(tiny_dir(MODEL))


@pytest.fixture(scope="module")
def files() -> list[bytes]:
    out = []
    for im in random_images(3, size=40, seed=5):
        buffer = io.BytesIO()
        im.image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def app_client(model: str, **options) -> TestClient:
    config = ServeConfig(model=model, device="cpu", max_batch_size=4, check=False, **options)
    return TestClient(create_app(config, background=False))


def client_for(http: TestClient, key: str = "unused") -> openai.OpenAI:
    """The official client, talking to the app through the TestClient (an httpx.Client)."""
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0
    )


@pytest.fixture(scope="module")
def http(model):
    with app_client(model) as client:
        yield client


def raw(model: str, files: list[bytes]) -> dict[str, torch.Tensor]:
    """What vitport infer gives for the same bytes (no normalisation)."""
    encoder = vitport.load(model)
    images = [LoadedImage(f"i{k}", read_image_bytes(d, f"i{k}")) for k, d in enumerate(files)]
    return infer(encoder, images, batch_size=4).features.groups()


def openai_error(reply) -> dict:
    """The reply's error object, checked to be in OpenAI's shape."""
    body = reply.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"]
    return error


# ------------------------------------------------------------------ API key


def test_api_key_guards_every_v1_path_and_leaves_the_probes_open(model, files):
    with app_client(model, api_key=KEY) as http:
        for key in ("unused", "s3cret-kez", "s3cret"):
            with pytest.raises(openai.AuthenticationError):
                client_for(http, key).embeddings.create(model=model, input=[b64(files[0])])
        reply = client_for(http, KEY).embeddings.create(model=model, input=[b64(files[0])])
        assert len(reply.data) == 1
        for path in ("/v1/models", "/v1/nothing-here"):
            missing = http.get(path)
            assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
            assert openai_error(missing)["code"] == "invalid_api_key"
            assert "Authorization: Bearer" in openai_error(missing)["message"]
        wrong = http.post(
            "/v1/embed",
            headers={"Authorization": "Bearer nope"},
            files=[("file", ("a.png", files[0], "image/png"))],
        )
        assert wrong.status_code == 401 and "wrong API key" in openai_error(wrong)["message"]
        keyed = http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert keyed.status_code == 200
        about = keyed.json()["data"][0]["vitport"]
        assert about["api_key_required"] is True and KEY not in keyed.text
        for probe in ("/health", "/ready", "/metrics"):
            assert http.get(probe).status_code == 200, probe
        metrics = http.get("/metrics").text
        assert 'endpoint="/v1/embeddings",outcome="unauthorized"} 3.0' in metrics
        assert 'endpoint="/v1/models",outcome="unauthorized"} 1.0' in metrics
        assert 'endpoint="unknown",outcome="unauthorized"} 1.0' in metrics


def test_a_server_open_beyond_loopback_without_a_key_is_warned_about():
    assert open_to_all("127.0.0.1", None) is None
    assert open_to_all("::1", None) is None and open_to_all("localhost", None) is None
    assert open_to_all("0.0.0.0", KEY) is None
    warning = open_to_all("0.0.0.0", None)
    assert warning and "--api-key" in warning and "VITPORT_API_KEY" in warning
    assert open_to_all("my-host.example", None)


def serve_cli(monkeypatch, capsys, caplog, *args: str, env: dict[str, str] | None = None):
    """`vitport serve ARGS` up to the point where the server would run: the Service it would
    serve (None where the command refused first), the exit code and stderr."""
    from vitport.cli import main
    from vitport.serve import server

    started = []

    def fake_serve(service, host, port):
        started.append(service)
        return SimpleNamespace(drained=None)

    monkeypatch.setattr(server, "serve", fake_serve)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["vitport", "serve", *args])
    monkeypatch.setenv("COLUMNS", "200")
    code = 0
    with caplog.at_level(logging.INFO, logger="vitport.serve"):
        try:
            main()
        except SystemExit as exc:
            code = exc.code or 0
    logging.getLogger("vitport.serve").handlers.clear()  # the handler the command added
    return (started[0] if started else None), code, capsys.readouterr().err


def test_cli_takes_the_key_from_the_environment_and_warns_when_open(
    monkeypatch, capsys, caplog, model
):
    common = ("--model", model, "--device", "cpu", "--port", "0")
    service, code, _ = serve_cli(
        monkeypatch, capsys, caplog, *common, "--host", "0.0.0.0", env={"VITPORT_API_KEY": KEY}
    )
    assert code == 0 and service.config.api_key == KEY and KEY not in repr(service.config)
    assert "without --api-key" not in caplog.text
    monkeypatch.delenv("VITPORT_API_KEY")
    caplog.clear()
    service, code, _ = serve_cli(monkeypatch, capsys, caplog, *common, "--host", "0.0.0.0")
    assert code == 0 and service.config.api_key is None
    assert "listening on 0.0.0.0 without --api-key" in caplog.text
    caplog.clear()
    service, _, _ = serve_cli(monkeypatch, capsys, caplog, *common, "--no-normalize")
    assert "without --api-key" not in caplog.text  # loopback: nothing to warn about
    assert service.config.normalize is False


def test_an_unknown_model_is_refused_before_the_server_starts(monkeypatch, capsys, caplog):
    service, code, err = serve_cli(
        monkeypatch, capsys, caplog, "--model", "demo:dinov2-huge", "--device", "cpu"
    )
    assert service is None and code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "unknown demo model 'dinov2-huge'" in lines[0]


# ------------------------------------------------------------------ normalisation


def norms(rows) -> np.ndarray:
    return np.linalg.norm(np.asarray(rows, dtype=np.float64), axis=-1)


def test_embeddings_have_unit_norm_by_default_and_a_request_can_say_otherwise(http, model, files):
    want = raw(model, files)
    client = client_for(http)
    inputs = [b64(f) for f in files]
    unit = client.embeddings.create(model=model, input=inputs)  # base64 on the wire
    assert np.allclose(norms([d.embedding for d in unit.data]), 1, atol=1e-5)
    assert norms(want["pooled"]).min() > 1.5  # the raw vectors are not unit already
    scaled = want["pooled"].double() / want["pooled"].double().norm(dim=-1, keepdim=True)
    assert np.allclose([d.embedding for d in unit.data], scaled.numpy(), atol=1e-5)
    same = client.embeddings.create(
        model=model, input=inputs, encoding_format="float", extra_body={"normalize": False}
    )
    assert np.allclose([d.embedding for d in same.data], want["pooled"].numpy(), atol=1e-5)
    patches = client.embeddings.create(
        model=model, input=inputs[:1], extra_body={"output": "patches"}
    )
    rows = np.asarray(patches.data[0].embedding).reshape(patches.data[0].model_extra["shape"])
    assert np.allclose(norms(rows), 1, atol=1e-5)  # each patch token its own unit vector
    about = http.get("/v1/models").json()["data"][0]["vitport"]
    assert about["normalize"] is True and about["api_key_required"] is False
    parts = [("file", ("a.png", files[0], "image/png"))]
    multipart = http.post("/v1/embed", files=parts).json()["data"][0]["pooled"]
    assert np.allclose(norms([multipart]), 1, atol=1e-5)
    plain = http.post("/v1/embed", files=parts, params={"normalize": "false"}).json()
    assert np.allclose(plain["data"][0]["pooled"], want["pooled"][0].numpy(), atol=1e-5)


def test_a_server_started_without_normalisation_serves_raw_vectors(model, files):
    want = raw(model, files[:1])["pooled"]
    with app_client(model, normalize=False) as http:
        client = client_for(http)
        got = client.embeddings.create(model=model, input=[b64(files[0])], encoding_format="float")
        assert np.allclose(got.data[0].embedding, want[0].numpy(), atol=1e-5)
        unit = client.embeddings.create(
            model=model, input=[b64(files[0])], extra_body={"normalize": True}
        )
        assert np.allclose(norms([unit.data[0].embedding]), 1, atol=1e-5)
        assert http.get("/v1/models").json()["data"][0]["vitport"]["normalize"] is False


def test_token_outputs_carry_their_shape(http, model, files):
    outputs = http.get("/v1/models").json()["data"][0]["vitport"]["outputs"]
    client = client_for(http)
    for output in ("patches", "registers"):
        for encoding in ("float", "base64"):
            reply = client.embeddings.create(
                model=model,
                input=[b64(files[0])],
                encoding_format=encoding,
                extra_body={"output": output},
            )
            shape = reply.data[0].model_extra["shape"]
            assert shape == outputs[output] and len(shape) == 2, (output, shape)
            values = reply.data[0].embedding
            if encoding == "base64":  # asked for by name, the client leaves it encoded
                values = np.frombuffer(base64.b64decode(values), dtype="<f4")
            assert np.asarray(values).reshape(shape).shape == tuple(shape)


# ------------------------------------------------------------------ errors


def test_every_error_is_in_openai_shape(http, model, files):
    unknown = http.get("/v1/nothing")
    assert unknown.status_code == 404
    assert "no such endpoint: GET /v1/nothing" in openai_error(unknown)["message"]
    assert "POST /v1/embeddings" in openai_error(unknown)["message"]
    method = http.get("/v1/embeddings")
    assert method.status_code == 405 and method.headers["allow"] == "POST"
    assert openai_error(method)["message"] == "GET /v1/embeddings is not allowed; use POST"
    client = client_for(http)
    with pytest.raises(openai.NotFoundError):
        client.get("/nothing", cast_to=object)

    def post(content=None, **kwargs) -> dict:
        reply = http.post("/v1/embeddings", content=content, **kwargs)
        assert reply.status_code == 400, reply.text
        return openai_error(reply)

    not_json = post(b"{not json", headers={"content-type": "application/json"})
    assert not_json["code"] == "invalid-json" and not_json["param"] is None
    assert not_json["message"].startswith("the body is not valid JSON (")
    assert "JSON decode error" not in not_json["message"]
    not_object = post(json=[b64(files[0])])
    assert "must be a JSON object" in not_object["message"]
    missing = post(json={"model": model})
    assert missing["param"] == "input" and "input is required" in missing["message"]
    for body, param, words in (
        ({"input": [[1, 2, 3]]}, "input[0]", "input[0] is a nested array (token ids"),
        ({"input": [b64(files[0]), [[1]]]}, "input[1]", "input[1] is a nested array"),
        ({"input": [1, 2, 3]}, "input[0]", "input[0] is a number (token ids"),
        ({"input": 7}, "input", "input is a number"),
        ({"input": {"image": "x"}}, "input", "input is an object"),
    ):
        error = post(json=body)
        assert error["param"] == param and error["code"] == "bad-input", error
        assert error["message"].startswith(words) and "data:image/" in error["message"]
        assert "input.str" not in error["message"]
    with pytest.raises(openai.BadRequestError, match="plain text, not an image"):
        client.embeddings.create(model=model, input="a photo of a cat")
    text = post(json={"input": ["a photo of a cat", "/home/me/cat.jpg"]})
    assert text["code"] == "plain-text" and text["param"] == "input[0]"
    assert "send each image's bytes as base64 or a data:image/" in text["message"]
    assert [e["code"] for e in text["entries"]] == ["plain-text", "plain-text"]
    wrapped = base64.encodebytes(files[0]).decode()  # base64 wrapped at 76 columns stays good
    assert http.post("/v1/embeddings", json={"input": [wrapped]}).status_code == 200


def test_a_request_without_model_is_served_by_the_served_model(http, model, files):
    """Decided: `model` may be left out (as vLLM and text-embeddings-inference allow); the
    reply names the served model. A model the server does not serve is a 404."""
    reply = http.post("/v1/embeddings", json={"input": [b64(files[0])]})
    assert reply.status_code == 200 and reply.json()["model"] == model
    other = http.post("/v1/embeddings", json={"model": "other", "input": [b64(files[0])]})
    assert other.status_code == 404 and openai_error(other)["code"] == "model_not_found"


# ------------------------------------------------------------------ start-up


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fake_sweep(monkeypatch, clock: FakeClock, speeds: dict[int, float], oom_at: int = 0):
    """bench_batch replaced: each batch size 'takes' its size in seconds on the fake clock and
    runs at the injected speed; the sizes asked for are recorded."""
    from vitport.bench import run as bench_run

    asked: list[int] = []

    def bench_batch(encoder, batch, window, setup=None):
        asked.append(batch)
        if batch == oom_at:
            raise OutOfMemoryError("out of memory (fake)")
        clock.now += batch
        return SimpleNamespace(measurement=SimpleNamespace(images_per_second=speeds[batch]))

    monkeypatch.setattr(bench_run, "bench_batch", bench_batch)
    return asked


def started(model: str, clock: FakeClock, caplog, **options) -> Service:
    config = ServeConfig(model=model, device="cpu", check=False, **options)
    service = Service(config, clock=clock)
    with caplog.at_level(logging.INFO, logger="vitport.serve"):
        service.start()
    service.stop()
    return service


def test_the_batch_size_sweep_is_bounded_in_time_and_logs_what_it_measured(
    monkeypatch, caplog, model
):
    clock = FakeClock()
    speeds = {b: 10.25 * b for b in (1, 2, 4, 8, 16, 32, 64)}  # still growing at 64
    asked = fake_sweep(monkeypatch, clock, speeds)
    service = started(model, clock, caplog, auto_batch_seconds=60)
    # 1+2+4+8+16 = 31 s spent; batch 32 would take about 2 x 16 s more, past 60 s
    assert asked == [1, 2, 4, 8, 16]
    assert service.auto_measured == {b: speeds[b] for b in asked}
    assert service.batcher.max_batch == 16
    text = caplog.text
    assert "auto batch size: timing batches 1, 2, 4, ... (up to 256) on cpu, for at most 60 s" in (
        text
    )
    for batch in asked:  # progress: one line as each size is measured
        assert f"auto batch size: batch {batch}: {speeds[batch]:.4g} img/s" in text
    assert "(5 sizes in 31 of 60 s)" in text
    measured = "measured 1: 10.25, 2: 20.5, 4: 41, 8: 82, 16: 164"
    assert f"auto batch size: 16 (164 img/s); {measured}" in text
    assert "stopped: batch 32 would end past the 60 s bound" in text
    about = service.models()["data"][0]["vitport"]
    assert about["auto_batch_measured"] == {str(b): speeds[b] for b in asked}


def test_the_sweep_stops_at_no_gain_or_out_of_memory(monkeypatch, caplog, model):
    clock = FakeClock()
    speeds = {1: 10.0, 2: 30.0, 4: 29.0, 8: 30.5, 16: 99.0}
    asked = fake_sweep(monkeypatch, clock, speeds)
    service = started(model, clock, caplog, auto_batch_seconds=1e6)
    assert asked == [1, 2, 4, 8] and service.batcher.max_batch == 8
    assert "stopped: no gain over the last 2 doublings" in caplog.text
    caplog.clear()
    asked = fake_sweep(monkeypatch, clock, {1: 10.0, 2: 30.0}, oom_at=4)
    service = started(model, clock, caplog, auto_batch_seconds=1e6)
    assert asked == [1, 2, 4] and service.batcher.max_batch == 2
    assert "stopped: batch 4 ran out of memory" in caplog.text


def test_a_cpu_fp32_server_checks_itself_against_fp64(caplog, model):
    config = ServeConfig(model=model, device="cpu", max_batch_size=2)
    service = Service(config)
    with caplog.at_level(logging.INFO, logger="vitport.serve"):
        service.start()
    service.stop()
    check = service.check_summary()
    assert check["passed"] and check["reference"] == "cpu fp64"
    assert "proves nothing" in check["reference_note"]
    assert "checked against cpu fp64 instead" in caplog.text
    assert 0 < check["worst_rel_error"] < 1e-4  # fp32 against fp64: small, and not zero


def test_a_server_stopped_during_start_up_never_says_ready(monkeypatch, caplog, model):
    config = ServeConfig(model=model, device="cpu", max_batch_size=2, check=False)
    service = Service(config)
    real_load = vitport.load

    def load_then_drain(*args, **kwargs):  # SIGTERM arrives while the model loads
        encoder = real_load(*args, **kwargs)
        service.begin_drain()
        service.stop()
        return encoder

    monkeypatch.setattr(vitport, "load", load_then_drain)
    with caplog.at_level(logging.DEBUG, logger="vitport.serve"):
        service.start()
    assert service.state == "stopped" and service.error is None and service.batcher is None
    assert "ready:" not in caplog.text
    assert "start-up abandoned" in caplog.text
    assert service.metrics.ready._value.get() == 0


def test_a_signal_during_the_sweep_ends_it_without_a_word_more(monkeypatch, caplog, model):
    clock = FakeClock()
    asked = fake_sweep(monkeypatch, clock, {b: 10.0 * b for b in (1, 2, 4, 8)})
    service = Service(ServeConfig(model=model, device="cpu", check=False), clock=clock)
    from vitport.bench import run as bench_run

    timed = bench_run.bench_batch

    def drained_at_4(encoder, batch, window, setup=None):
        if batch == 4:  # SIGTERM while batch 4 is timed
            service.begin_drain()
        return timed(encoder, batch, window, setup)

    monkeypatch.setattr(bench_run, "bench_batch", drained_at_4)
    with caplog.at_level(logging.INFO, logger="vitport.serve"):
        service.start()
    assert asked == [1, 2, 4] and service.batcher is None and service.error is None
    assert "batch 2: 20 img/s" in caplog.text and "batch 4:" not in caplog.text
    assert "ready:" not in caplog.text


# ------------------------------------------------------------------ help


def test_serve_help_shows_every_option_name_whole_at_80_columns(monkeypatch, capsys):
    from vitport.cli import main
    from vitport.cli.app import app

    monkeypatch.setattr(sys, "argv", ["vitport", "serve", "--help"])
    monkeypatch.setenv("COLUMNS", "80")
    with contextlib.suppress(SystemExit):
        main()
    out = capsys.readouterr().out
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    import typer.main

    command = typer.main.get_command(app).commands["serve"]
    names = [o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
    assert "--max-images-per-request" in names and "--api-key" in names
    for name in names:
        assert f" {name} " in out, name
