"""Tests for vitport.bench.e2e: image files to features through DataLoader workers, timed."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitport
from vitport.bench import e2e
from vitport.bench.e2e import E2EResult, StageTimes, run_e2e
from vitport.encoder import Preprocess
from vitport.errors import ImageError, VitportError

GOOD = 12
PHRASES = re.compile(
    r"^(data loading: the model waits \d+% of the wall time for images"
    r"|model-bound: \d+% of wall time in the model"
    r"|host-to-device copy: \d+% of wall time"
    r"|main-process overhead: \d+% of wall time)"
)


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    return vitport.load(str(tiny_dir("dinov2")))


def _gradient(width: int, height: int) -> np.ndarray:
    x = np.linspace(0, 255, width)[None, :]
    y = np.linspace(0, 255, height)[:, None]
    rgb = [np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)), (x + y) / 2]
    return np.stack(rgb, axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """12 good PNG/JPEG files of different sizes and modes, and one corrupt file."""
    d = tmp_path_factory.mktemp("e2e-images")
    sizes = [(40, 30), (28, 28), (64, 48), (33, 77), (100, 20), (50, 50)]
    modes = ["RGB", "L", "RGBA", "P", "LA", "1"]
    for i, ((w, h), mode) in enumerate(zip(sizes, modes, strict=True)):
        rgb = Image.fromarray(_gradient(w, h))
        rgb.convert(mode).save(d / f"png_{i:02d}_{mode}.png")
        jpeg_mode = "CMYK" if mode == "RGBA" else ("L" if mode in ("L", "LA", "1") else "RGB")
        rgb.convert(jpeg_mode).save(d / f"jpg_{i:02d}_{jpeg_mode}.jpg", quality=90)
    (d / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    return d


@pytest.fixture(scope="module")
def paths(image_dir) -> list[Path]:
    return sorted(image_dir.iterdir())


@pytest.fixture(scope="module")
def result(encoder, paths) -> E2EResult:
    return run_e2e(encoder, paths, batch_size=4, workers=0)


def test_counts_good_images_and_records_the_corrupt_one(result, paths):
    assert len(paths) == GOOD + 1
    assert result.images == GOOD
    assert len(result.skipped) == 1
    name, reason = result.skipped[0]
    assert name.endswith("zz_broken.jpg")
    assert reason and "\n" not in reason
    assert result.batch_size == 4
    assert result.workers == 0 and result.workers_requested == 0
    assert result.device == "cpu"
    assert math.isfinite(result.checksum)


def test_stage_times(result):
    stages = result.stages
    for name in e2e.STAGES:
        assert getattr(stages, name) >= 0.0, name
    assert stages.model > 0.0
    assert stages.decode > 0.0 and stages.preprocess > 0.0
    assert result.wall_seconds > 0.0
    # the main-process stages happen one after another inside the wall time
    main = stages.data_wait + stages.host_to_device + stages.model
    assert main <= result.wall_seconds * 1.01 + 1e-4


def test_breakdown_and_throughput(result):
    ms = result.breakdown()
    assert set(ms) == {*e2e.STAGES, "wall"}
    assert ms["wall"] == pytest.approx(1000 * result.wall_seconds / result.images)
    for name in e2e.STAGES:
        assert ms[name] == pytest.approx(1000 * getattr(result.stages, name) / result.images)
    assert result.images_per_second == pytest.approx(result.images / result.wall_seconds)
    shares = result.fractions()
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.02)


def test_bottleneck_is_one_expected_line(result):
    line = result.bottleneck()
    assert "\n" not in line
    assert PHRASES.match(line), line


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_give_the_same_images(encoder, paths, result, workers):
    got = run_e2e(encoder, paths, batch_size=5, workers=workers, warmup_batches=2)
    assert got.images == result.images
    assert [n for n, _ in got.skipped] == [n for n, _ in result.skipped]
    assert got.workers == workers  # fork on Linux: the closure preprocess needs no pickling
    assert got.notes == []
    assert got.checksum == pytest.approx(result.checksum, rel=1e-5)
    assert got.stages.model > 0.0


def test_repeats_count_every_pass_and_skip_once(encoder, paths):
    got = run_e2e(encoder, paths, batch_size=1, workers=0, repeats=2, warmup_batches=0)
    assert got.images == 2 * GOOD
    assert len(got.skipped) == 1  # recorded once; its batch of one was empty and skipped


def test_warmup_longer_than_the_dataset(encoder, paths):
    got = run_e2e(encoder, paths[:3], batch_size=2, workers=0, warmup_batches=10)
    assert got.images == 3


def test_round_trip_through_json(result):
    text = json.dumps(result.to_dict())
    data = json.loads(text)
    back = E2EResult.from_dict(data)
    assert back == result
    assert isinstance(back.stages, StageTimes)
    assert all(isinstance(item, tuple) for item in back.skipped)
    assert data["images_per_second"] == pytest.approx(result.images_per_second)
    assert data["bottleneck"] == result.bottleneck()
    assert set(data["breakdown_ms_per_image"]) == {*e2e.STAGES, "wall"}


def test_slow_preprocess_is_named_as_the_bottleneck(encoder, paths, monkeypatch, fake_clock):
    original = encoder.preprocess

    def slow(images):
        fake_clock.sleep(0.05 * len(images))  # 50 ms an image; the model takes no clock time
        return original(images)

    monkeypatch.setattr(encoder, "preprocess", Preprocess(slow, original.image_size, {}))
    got = run_e2e(encoder, paths, batch_size=4, workers=0)
    assert got.images == GOOD
    assert got.stages.preprocess == pytest.approx(0.05 * GOOD, abs=1e-3)
    line = got.bottleneck()
    assert line.startswith("data loading:"), line
    assert "preprocessing" in line and "--workers" in line


def spawn_workers(monkeypatch) -> None:
    """Make the DataLoader start its workers with spawn (pickling everything they need)."""
    from vitport.inputs import stream

    made = stream.make_loader

    def spawning(dataset, batch_size, workers, pin):
        loader = made(dataset, batch_size, workers, pin)
        if workers:
            loader.multiprocessing_context = "spawn"
        return loader

    monkeypatch.setattr(stream, "make_loader", spawning)


@pytest.mark.filterwarnings("ignore:Got pickle error")
def test_workers_that_cannot_start_fall_back_to_none(encoder, paths, monkeypatch):
    # Under spawn an unpicklable preprocess (a closure here) cannot reach the workers.
    inner = encoder.preprocess.fn
    monkeypatch.setattr(encoder.preprocess, "fn", lambda images: inner(images))
    spawn_workers(monkeypatch)
    got = run_e2e(encoder, paths, batch_size=4, workers=2)
    assert got.workers == 0 and got.workers_requested == 2
    assert got.images == GOOD
    assert len(got.notes) == 1 and "ran with 0 workers" in got.notes[0]


@pytest.mark.slow
def test_preprocess_is_picklable_so_spawned_workers_run(encoder, paths, monkeypatch):
    spawn_workers(monkeypatch)
    got = run_e2e(encoder, paths, batch_size=4, workers=2)
    assert got.workers == 2 and got.images == GOOD


def test_preprocess_failure_skips_the_image(encoder, paths, monkeypatch):
    original = encoder.preprocess

    def picky(images):
        if images[0].size == (28, 28):
            raise ValueError("cannot handle this one")
        return original(images)

    monkeypatch.setattr(encoder, "preprocess", Preprocess(picky, original.image_size, {}))
    got = run_e2e(encoder, paths, batch_size=4, workers=0)
    assert got.images == GOOD - 2  # one PNG and one JPEG are 28x28
    reasons = dict(got.skipped)
    assert len(reasons) == 3
    assert sum("preprocessing failed" in r for r in reasons.values()) == 2


def test_nothing_usable_raises(encoder, image_dir):
    with pytest.raises(ImageError, match="the one file could not be used"):
        run_e2e(encoder, [image_dir / "zz_broken.jpg"], workers=0)
    with pytest.raises(ImageError):
        run_e2e(encoder, [], workers=0)


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 0}, {"workers": -1}, {"repeats": 0}, {"warmup_batches": -1}],
)
def test_bad_arguments(encoder, paths, kwargs):
    with pytest.raises(VitportError):
        run_e2e(encoder, paths, **kwargs)


def test_bottleneck_phrasings():
    def made(**stages: float) -> E2EResult:
        return E2EResult(
            images=10,
            skipped=[],
            batch_size=2,
            workers=2,
            wall_seconds=1.0,
            stages=StageTimes(**stages),
        )

    waiting = made(decode=3.0, preprocess=1.0, data_wait=0.62, model=0.3)
    assert waiting.bottleneck() == (
        "data loading: the model waits 62% of the wall time for images (mostly decoding); "
        "add --workers (now 2)"
    )
    assert (
        made(data_wait=0.05, model=0.91).bottleneck()
        == "model-bound: 91% of wall time in the model"
    )
    assert (
        made(data_wait=0.1, host_to_device=0.6, model=0.2)
        .bottleneck()
        .startswith("host-to-device copy: 60%")
    )
    assert made(model=0.2).bottleneck().startswith("main-process overhead: 80%")
    empty = E2EResult(0, [], 1, 0, 0.0, StageTimes())
    assert empty.images_per_second == 0.0
    assert "no images" in empty.bottleneck()
