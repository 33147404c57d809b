"""hf:, atomgit: and timm: downloads end to end against a local hub, without the internet:
a model, a 404, a gated 401, and a connection that dies mid-file, then a run that succeeds."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hubstub import StubHub

import vitport
from vitport.errors import HubUnreachableError, SpecError, VitportError, WeightsError
from vitport.families.sources import ATOMGIT, atomgit_repo_id, default_branch, hub_snapshot

TIMM_REPO = "timm/vit_small_patch14_reg4_dinov2.lvd142m"
SEED_ID = "hf_mirrors/facebook/dinov2-large"  # as the seeds write it (atomgit download …)
SEED_REPO = "hf_mirrors-facebook/dinov2-large"  # as AtomGit's client asks the hub for it


@pytest.fixture
def hub(tiny_dir, tmp_path, monkeypatch):
    """A running stub hub that huggingface_hub talks to, with an empty download cache."""
    import huggingface_hub.constants as constants

    with StubHub() as stub:
        stub.add("org/tiny", tiny_dir("dinov2"))
        stub.add("org/gated", tiny_dir("dinov2"), "gated")
        stub.add("org/cut", tiny_dir("dinov2"), "cut")
        stub.add(TIMM_REPO, tiny_dir("timm_vit_reg4"))
        stub.add(SEED_REPO, tiny_dir("dinov2"))  # the seeds' own id, rewritten by AtomGit
        stub.add("org/old", tiny_dir("dinov2"), branch="master")
        stub.add("org/older", tiny_dir("dinov2"), branch="master", reports_branch=False)
        stub.add("org/xet", tiny_dir("dinov2"), "xet")
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
    vitport.load("atomgit:org/tiny")  # cached now; its default branch is asked with this token
    assert not any("hf_secret" in t for t in hub.tokens)
    assert "Bearer atomgit_token" in hub.tokens


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


def test_atomgit_ids_as_its_client_rewrites_them():
    assert atomgit_repo_id(SEED_ID) == SEED_REPO
    assert atomgit_repo_id("org/tiny") == "org/tiny"
    for bad in ("a/b/c/d", "tiny", "org/", "/tiny", "a//b"):
        with pytest.raises(SpecError, match=f"'{bad}' is not an AtomGit repository id"):
            atomgit_repo_id(bad)


def test_the_seeds_three_part_id_loads(hub, monkeypatch, capsys):
    from test_cli import run

    code, out, err = run(monkeypatch, capsys, "infer", "--model", f"atomgit:{SEED_ID}")
    assert code == 0, err
    assert "patches" in out and "dinov2-large" in out
    assert any(r.startswith(f"GET /{SEED_REPO}/resolve/") for r in hub.requests)


@pytest.mark.parametrize("repo", ["org/old", "org/older"])  # reports master / is silent
def test_a_repository_served_only_at_master_loads(hub, monkeypatch, capsys, repo):
    from test_cli import run

    code, out, err = run(monkeypatch, capsys, "infer", "--model", f"atomgit:{repo}")
    assert code == 0, err
    assert any(r.startswith(f"GET /{repo}/resolve/") for r in hub.requests)
    assert default_branch(repo, ATOMGIT) == "master"
    assert default_branch("org/tiny", ATOMGIT) == "main"


def test_atomgit_downloads_load_again_offline_from_the_cache(hub, monkeypatch):
    import huggingface_hub.constants as constants

    for spec in (f"atomgit:{SEED_ID}", "atomgit:org/old"):
        vitport.load(spec)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    for spec in (f"atomgit:{SEED_ID}", "atomgit:org/old"):  # main, and master-only
        assert vitport.load(spec).family == "transformers/dinov2"
    assert hub.requests == []


def test_atomgit_downloads_with_xet_off(hub):
    """The stub's "xet" files point at a Xet token route it lacks: the Hugging Face hub's
    client (Xet on) fails there, AtomGit's way (Xet off) downloads plain files."""
    assert vitport.load("atomgit:org/xet").family == "transformers/dinov2"
    assert not any("xet-read-token" in r for r in hub.requests)
    with pytest.raises(VitportError):
        vitport.load("hf:org/xet")
    assert any("xet-read-token" in r for r in hub.requests)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("atomgit:hf_mirrors/nobody/nothing", "no repository 'hf_mirrors/nobody/nothing' on"),
        ("atomgit:a/b/c/d", "'a/b/c/d' is not an AtomGit repository id"),
        ("atomgit:", "atomgit: needs a repository id"),
        ("hf:", "hf: needs a repository id"),
    ],
)
def test_bad_atomgit_ids_are_one_line_naming_the_users_id(hub, monkeypatch, capsys, spec, message):
    from test_cli import run

    code, _, err = run(monkeypatch, capsys, "infer", "--model", spec)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert "hf:hf_mirrors" not in err and "HFValidationError" not in err


def test_an_unreachable_atomgit_never_advises_another_hub(hub, monkeypatch):
    monkeypatch.setenv("VITPORT_ATOMGIT_ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    with pytest.raises(HubUnreachableError) as info:
        vitport.load(f"atomgit:{SEED_ID}")
    message = str(info.value)
    assert f"could not download '{SEED_ID}' from AtomGit at http://127.0.0.1:9" in message
    assert "hf:" not in message and "ms:" not in message and "\n" not in message


# AtomGit's own client, run in its own process only: importing it sets HF_ENDPOINT and HF_HOME
# and swaps huggingface_hub's HTTP client for one whose errors huggingface_hub 2 cannot read
needs_atomgit = pytest.mark.skipif(
    importlib.util.find_spec("atomgit") is None, reason="AtomGit's client: make install"
)


def atomgit_client(hub, home: Path, *args: str) -> subprocess.CompletedProcess:
    """AtomGit's own client as its users run it, with HF_ENDPOINT at the stub (its CLI then
    sets HF_ENDPOINT to hub.atomgit.com for its branch probes: a proxy that refuses keeps them
    off the network; its downloads go where huggingface_hub was first pointed, the stub)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(
        HF_ENDPOINT=hub.url,
        HOME=str(home),
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        NO_PROXY="127.0.0.1,localhost",
    )
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=300
    )


def snapshot_files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(directory).parts
    }


@needs_atomgit
@pytest.mark.parametrize("user_id", [SEED_ID, "org/tiny"])
def test_atomgit_client_downloads_the_files_vitport_loads(hub, tmp_path, user_id):
    got = atomgit_client(
        hub, tmp_path / "home", "-m", "atomgit", "download", user_id, "-d", str(tmp_path / "d")
    )
    assert got.returncode == 0, got.stdout + got.stderr
    theirs = snapshot_files(tmp_path / "d")
    ours = snapshot_files(hub_snapshot(user_id, ATOMGIT))
    assert theirs and theirs == ours
    assert vitport.load(str(tmp_path / "d")).family == "transformers/dinov2"


@needs_atomgit
@pytest.mark.parametrize("repo", ["org/old", "org/older"])
def test_atomgit_client_finds_master_on_the_stub_as_vitport_does(hub, tmp_path, repo):
    """The stub's master-only repositories, as AtomGit's client library sees them: it finds
    master by the same answers vitport reads. (Its package sets HF_ENDPOINT to hub.atomgit.com
    on import, and its branch probes read that variable at each call: it is set back here.)"""
    code = (
        "import os, sys; from atomgit.atomgit_hub import _default_revision, snapshot_download;"
        "os.environ['HF_ENDPOINT'] = sys.argv[3]; print(_default_revision(sys.argv[1]));"
        "snapshot_download(sys.argv[1], local_dir=sys.argv[2])"
    )
    got = atomgit_client(hub, tmp_path / "home", "-c", code, repo, str(tmp_path / "d"), hub.url)
    assert got.returncode == 0, got.stdout + got.stderr
    assert got.stdout.splitlines()[0] == "master"
    assert snapshot_files(tmp_path / "d") == snapshot_files(hub_snapshot(repo, ATOMGIT))


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
