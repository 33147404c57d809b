"""hf:, atomgit: and timm: downloads end to end against a local hub, without the internet:
a model, a 404, a gated 401, and a connection that dies mid-file, then a run that succeeds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hubstub import StubHub

import vitport
from vitport.errors import HubUnreachableError, SpecError, WeightsError

TIMM_REPO = "timm/vit_small_patch14_reg4_dinov2.lvd142m"


@pytest.fixture
def hub(tiny_dir, tmp_path, monkeypatch):
    """A running stub hub that huggingface_hub talks to, with an empty download cache."""
    import huggingface_hub.constants as constants

    with StubHub() as stub:
        stub.add("org/tiny", tiny_dir("dinov2"))
        stub.add("org/gated", tiny_dir("dinov2"), "gated")
        stub.add("org/cut", tiny_dir("dinov2"), "cut")
        stub.add(TIMM_REPO, tiny_dir("timm_vit_reg4"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", stub.url)  # a mirror, as seed 002 advises
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("VITPORT_ATOMGIT_ENDPOINT", stub.url)
        monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "5")
        yield stub


@pytest.mark.parametrize("prefix", ["hf:", "atomgit:"])
def test_a_model_downloads_and_loads(hub, prefix):
    encoder = vitport.load(f"{prefix}org/tiny")
    assert encoder.family == "transformers/dinov2"
    assert any(r.startswith("GET /org/tiny/resolve/") for r in hub.requests)


def test_atomgit_never_gets_the_hugging_face_token(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    vitport.load("atomgit:org/tiny")
    assert hub.tokens and not any("hf_secret" in t for t in hub.tokens)
    monkeypatch.setenv("VITPORT_ATOMGIT_TOKEN", "atomgit_token")
    hub.tokens.clear()
    vitport.load("atomgit:org/tiny")  # cached now; a fresh download would carry this token
    assert not any("hf_secret" in t for t in hub.tokens)


def test_timm_pretrained_weights_through_the_hub(hub):
    encoder = vitport.load("timm:vit_small_patch14_reg4_dinov2.lvd142m")
    assert encoder.family == "timm" and encoder.layout.num_registers == 4
    assert any(TIMM_REPO in r for r in hub.requests)


@pytest.mark.parametrize("prefix", ["hf:", "atomgit:"])
def test_missing_repository_is_one_line(hub, prefix):
    with pytest.raises(SpecError, match="no repository 'org/nope' on") as info:
        vitport.load(f"{prefix}org/nope")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("prefix", "cure"), [("hf:", "hf auth login"), ("atomgit:", "VITPORT_ATOMGIT_TOKEN")]
)
def test_gated_repository_says_how_to_get_access(hub, prefix, cure):
    with pytest.raises(WeightsError, match="is gated") as info:
        vitport.load(f"{prefix}org/gated")
    assert cure in str(info.value)


def test_cut_download_is_reported_never_loaded_and_a_later_run_succeeds(hub, monkeypatch):
    import huggingface_hub.constants as constants

    with pytest.raises(HubUnreachableError, match="could not download 'org/cut' from AtomGit"):
        vitport.load("atomgit:org/cut")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # only the interrupted cache is left
    with pytest.raises((WeightsError, HubUnreachableError)):
        vitport.load("atomgit:org/cut")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.modes["org/cut"] = "ok"
    assert vitport.load("atomgit:org/cut").family == "transformers/dinov2"


@pytest.mark.slow
def test_hf_endpoint_mirror_from_the_shell(hub, tmp_path):
    """A user's HF_ENDPOINT (seed 002's mirror advice) reaches the mirror, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf-home"),
        PYTHONPATH=str(Path(vitport.__file__).parents[1]),
    )
    got = subprocess.run(
        [sys.executable, "-m", "vitport", "infer", "--model", "hf:org/tiny", "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert got.returncode == 0, got.stderr
    assert "hf:org/tiny" in got.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "vitport", "infer", "--model", "hf:org/nope"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2
    assert [line for line in missing.stderr.splitlines() if line.startswith("error:")] == [
        "error: no repository 'org/nope' on the Hugging Face hub; check the name"
    ]
