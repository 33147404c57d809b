"""`vitport publish`: a packaged tiny port goes to a local stub hub through huggingface_hub's
own upload code (AtomGit and the Hugging Face hub) or modelscope's HubApi (checked against its
real signatures), comes back down through vitport and AtomGit's own client, and every refusal
is one line with nothing sent."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from every_command import cli
from hubstub import StubHub

from vitport.port.manifest import GOLDEN, MANIFEST, WEIGHTS, read_manifest
from vitport.port.package import write_card

FAILS = "**This port FAILS its accuracy check**"

ATOMGIT_TOKEN = "atomgit_write_token"
HF_SECRET = "hf_secret_token"


QUICK = ("--batch-sizes", "1", "--min-seconds", "0.05")


@pytest.fixture(scope="module")
def packaged(tiny_dir, tmp_path_factory) -> Path:
    """A port of a tiny DINOv2 as `vitport report --package` writes it (bf16 with a fix on the
    CPU against the fp32 reference), made once; each test publishes its own copy."""
    from vitport.cli import main

    out = tmp_path_factory.mktemp("packaged") / "port"
    args = ["report", "--model", str(tiny_dir("dinov2")), "--device", "cpu", "--dtype", "bf16"]
    args += ["--fix", "layernorm-fp32"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["vitport", *args, *QUICK, "--out", str(out), "--package"])
        mp.setenv("COLUMNS", "200")
        with pytest.raises(SystemExit) as stop:
            main()
            raise SystemExit(0)
    assert stop.value.code in (0, None)
    assert read_manifest(out) is not None and read_manifest(out).passed
    return out


def copy_port(packaged: Path, out: Path, passed: bool = True, allow_fail: bool = False) -> Path:
    """A copy of the packaged port; `passed=False` makes its verdict FAIL, as a run that failed
    its check is packaged (`allow_fail` as the packaging would record it)."""
    shutil.copytree(packaged, out)
    manifest = read_manifest(out)
    verdict = {**manifest.verdict, "passed": passed}
    replace(manifest, verdict=verdict, allow_fail=allow_fail).write(out)
    if allow_fail:
        write_card(out, read_manifest(out))
    return out


@pytest.fixture
def port(packaged, tmp_path) -> Path:
    return copy_port(packaged, tmp_path / "port")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A stub hub that takes writes only with the AtomGit token; the Hugging Face token is set
    too, so that a test sees it is never sent there."""
    import huggingface_hub.constants as constants

    with StubHub() as stub:
        stub.write_token = ATOMGIT_TOKEN
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("VITPORT_ATOMGIT_ENDPOINT", stub.url)
        monkeypatch.setenv("VITPORT_ATOMGIT_TOKEN", ATOMGIT_TOKEN)
        monkeypatch.setenv("HF_ENDPOINT", stub.url)
        monkeypatch.setenv("HF_TOKEN", HF_SECRET)
        monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "5")
        yield stub


def private(created: dict) -> bool:
    """Whether a repository creation asked for a private one (huggingface_hub 1.x sends
    `private`, 2.x `visibility`)."""
    return created.get("private") is True or created.get("visibility") == "private"


def package_files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def test_publish_to_atomgit_uploads_the_port_with_its_own_token(hub, port, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "publish", str(port), "atomgit:org/tiny-port")
    assert code == 0, err
    files = package_files(port)
    assert {MANIFEST, GOLDEN, WEIGHTS, "README.md", "config.json"} <= set(files)
    assert f"{hub.url}/org/tiny-port" in out
    assert f"uploaded {len(files)} files" in out and all(name in out for name in files)
    assert [c["files"] for c in hub.commits] == [files]
    assert hub.commits[0]["revision"] == "main"
    assert [(c["organization"], c["name"], private(c)) for c in hub.created] == [
        ("org", "tiny-port", False)
    ]
    # every write carried the AtomGit token, and no request the Hugging Face one
    assert hub.tokens and all(HF_SECRET not in t for t in hub.tokens)
    assert {c["token"] for c in hub.commits} == {f"Bearer {ATOMGIT_TOKEN}"}
    # the weights went up through LFS, Xet never offered (as AtomGit's own client)
    assert hub.lfs_batches and all("xet" not in b["transfers"] for b in hub.lfs_batches)
    for name in files:
        assert (hub.repos["org/tiny-port"] / name).read_bytes() == (port / name).read_bytes()


def test_a_second_publish_of_an_unchanged_port_uploads_nothing_new(hub, port):
    from vitport.port.publish import publish

    first = publish(port, "atomgit:org/again")
    assert set(first.uploaded) == set(package_files(port)) and first.commit
    second = publish(port, "atomgit:org/again")
    assert second.nothing_new and second.uploaded == ()
    assert set(second.unchanged) == set(package_files(port))
    assert second.commit == first.commit and len(hub.commits) == 1
    puts = [r for r in hub.requests if r.startswith("PUT /lfs-objects/")]
    assert len(puts) == len(hub.lfs) >= 2  # weights, golden file, plots: each sent once
    # a changed card goes up alone
    card = port / "README.md"
    card.write_text(card.read_text() + "\nv2\n")
    third = publish(port, "atomgit:org/again", message="card v2")
    assert third.uploaded == ("README.md",) and third.commit != first.commit
    assert hub.commits[-1]["files"] == ["README.md"] and hub.commits[-1]["summary"] == "card v2"


def test_the_unchanged_report_on_the_command_line(hub, port, monkeypatch, capsys):
    assert cli(monkeypatch, capsys, "publish", str(port), "atomgit:org/twice")[0] == 0
    code, out, _ = cli(monkeypatch, capsys, "publish", str(port), "atomgit:org/twice")
    assert code == 0 and "nothing new" in out and "uploaded" not in out


def test_private_and_a_revision_reach_the_hub(hub, port):
    from vitport.port.publish import publish

    result = publish(port, "atomgit:org/priv", private=True, revision="v1")
    assert private(hub.created[-1])
    assert result.revision == "v1" and hub.commits[-1]["revision"] == "v1"
    assert "v1" in hub.refs["org/priv"]


def test_a_three_part_atomgit_id_is_published_as_atomgit_names_it(hub, port):
    from vitport.port.publish import publish

    result = publish(port, "atomgit:hf_mirrors/org/tiny")
    assert result.repo_id == "hf_mirrors-org/tiny" and "hf_mirrors-org/tiny" in hub.repos


def test_an_atomgit_repository_on_master_gets_the_commit_there(hub, port, tmp_path):
    """No --revision: the repository's own default branch, found as AtomGit's client finds it."""
    from vitport.port.publish import publish

    (tmp_path / "older").mkdir()
    hub.add("org/older", tmp_path / "older", branch="master")
    result = publish(port, "atomgit:org/older")
    assert result.revision == "master" and hub.commits[-1]["revision"] == "master"
    assert (tmp_path / "older" / MANIFEST).read_bytes() == (port / MANIFEST).read_bytes()


def test_publish_to_the_hugging_face_hub_sends_its_token(hub, port, monkeypatch):
    """Xet off: the stub speaks only the LFS basic transfer (huggingface.co takes Xet)."""
    import huggingface_hub.constants as constants

    from vitport.port.publish import publish

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    hub.write_token = HF_SECRET
    result = publish(port, "hf:org/tiny-hf")
    assert result.hub == "the Hugging Face hub" and result.url == f"{hub.url}/org/tiny-hf"
    assert hub.commits[-1]["token"] == f"Bearer {HF_SECRET}"


def test_a_published_port_downloads_through_vitport(hub, port, monkeypatch):
    from vitport.families.sources import ATOMGIT, hub_snapshot
    from vitport.port.publish import publish

    publish(port, "atomgit:org/down")
    monkeypatch.delenv("VITPORT_ATOMGIT_TOKEN")  # a reader's machine: a public repository
    got = hub_snapshot("org/down", ATOMGIT)
    for name in (MANIFEST, WEIGHTS, "config.json"):
        assert (got / name).read_bytes() == (port / name).read_bytes()
    assert read_manifest(got) == read_manifest(port)


@pytest.mark.slow
def test_a_published_port_downloads_through_atomgits_own_client(hub, port, tmp_path):
    """`python -m atomgit download ORG/NAME -d DIR`, with HF_ENDPOINT at the hub, as its users
    run it, gets every file that was published."""
    import subprocess

    from vitport.port.publish import publish

    publish(port, "atomgit:org/down")
    (tmp_path / "home").mkdir()
    env = {
        "HF_ENDPOINT": hub.url,
        "HOME": str(tmp_path / "home"),
        "PATH": "/usr/bin:/bin",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    out = tmp_path / "atomgit-download"
    done = subprocess.run(
        [sys.executable, "-m", "atomgit", "download", "org/down", "-d", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    downloaded = [n for n in package_files(out) if not n.startswith(".cache/")]
    assert downloaded == package_files(port)
    for name in downloaded:
        assert (out / name).read_bytes() == (port / name).read_bytes()


@pytest.mark.slow
def test_a_published_port_is_re_verified_from_the_hub_with_its_fixes_and_golden_file(
    hub, port, tmp_path, monkeypatch, capsys
):
    """The issue's end to end: publish, then on a reader's machine (no token) infer and compare
    load `atomgit:ORG/NAME` back at the port's dtype and fixes, against its own golden file."""
    from vitport.encoder import Features

    code, _, err = cli(monkeypatch, capsys, "publish", str(port), "atomgit:org/e2e")
    assert code == 0, err
    monkeypatch.delenv("VITPORT_ATOMGIT_TOKEN")
    out = tmp_path / "f.safetensors"
    args = ("--model", "atomgit:org/e2e", "--device", "cpu")
    code, stdout, err = cli(monkeypatch, capsys, "infer", *args, "--out", str(out))
    assert code == 0, err
    assert "port: bf16 with layernorm-fp32 from vitport.json" in stdout
    meta = Features.load(out).meta
    assert meta["dtype"] == "bf16" and meta["fixes"] == ["layernorm-fp32"]
    record = tmp_path / "compare.json"
    code, stdout, err = cli(monkeypatch, capsys, "compare", *args, "--json", str(record))
    assert code == 0, stdout + err
    result = json.loads(record.read_text())
    assert result["passed"] and result["reference"]["kind"] == "golden"
    assert Path(result["reference"]["path"]).read_bytes() == (port / GOLDEN).read_bytes()
    assert result["candidate"]["dtype"] == "bf16"
    assert result["candidate"]["fixes"] == ["layernorm-fp32"]
    assert "reference: the port's own golden file" in stdout


# --- refusals: one line, exit 2, nothing sent ---------------------------------------------


def refused(monkeypatch, capsys, hub, *args: str) -> str:
    code, out, err = cli(monkeypatch, capsys, "publish", *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    assert hub.requests == [] and hub.commits == []
    return lines[0]


def test_a_directory_that_is_not_a_port_is_refused(hub, tiny_dir, tmp_path, monkeypatch, capsys):
    line = refused(monkeypatch, capsys, hub, str(tiny_dir("dinov2")), "atomgit:org/x")
    assert "not a vitport port (no vitport.json)" in line and "--package" in line
    line = refused(monkeypatch, capsys, hub, str(tmp_path / "nowhere"), "atomgit:org/x")
    assert "is not a directory" in line


def test_a_failed_port_is_refused_without_allow_fail(hub, packaged, tmp_path, monkeypatch, capsys):
    failed = copy_port(packaged, tmp_path / "failed", passed=False)
    line = refused(monkeypatch, capsys, hub, str(failed), "atomgit:org/x")
    assert "verdict FAIL" in line and "--allow-fail" in line
    assert FAILS not in (failed / "README.md").read_text()  # refused: the port is as it was


def test_allow_fail_makes_the_card_say_so_before_it_goes_up(
    hub, packaged, tmp_path, monkeypatch, capsys
):
    failed = copy_port(packaged, tmp_path / "failed", passed=False)
    code, out, err = cli(
        monkeypatch, capsys, "publish", str(failed), "atomgit:org/f", "--allow-fail"
    )
    assert code == 0, err
    assert "now state its FAIL verdict" in out
    assert read_manifest(failed).allow_fail and FAILS in (failed / "README.md").read_text()
    published = hub.repos["org/f"]
    assert FAILS in (published / "README.md").read_text()
    assert read_manifest(published).allow_fail and not read_manifest(published).passed


def test_a_failed_port_whose_card_says_so_goes_up_as_it_is(hub, packaged, tmp_path):
    from vitport.port.publish import publish

    stated = copy_port(packaged, tmp_path / "stated", passed=False, allow_fail=True)
    before = {name: (stated / name).read_bytes() for name in package_files(stated)}
    result = publish(stated, "atomgit:org/s", allow_fail=True)
    assert result.allow_fail and not result.amended
    assert {name: (stated / name).read_bytes() for name in package_files(stated)} == before
    assert FAILS in (hub.repos["org/s"] / "README.md").read_text()


def test_a_missing_token_is_refused_naming_its_variable(hub, port, monkeypatch, capsys):
    monkeypatch.delenv("VITPORT_ATOMGIT_TOKEN")
    line = refused(monkeypatch, capsys, hub, str(port), "atomgit:org/x")
    assert "VITPORT_ATOMGIT_TOKEN" in line  # the Hugging Face token, set, is never taken instead
    monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
    assert "MODELSCOPE_API_TOKEN" in refused(monkeypatch, capsys, hub, str(port), "ms:org/x")
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(port.parent / "no-token-here"))
    assert "HF_TOKEN" in refused(monkeypatch, capsys, hub, str(port), "hf:org/x")


def test_weights_changed_after_packaging_are_refused(hub, port, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    tensors = load_file(port / WEIGHTS)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, port / WEIGHTS, metadata={"format": "pt"})
    line = refused(monkeypatch, capsys, hub, str(port), "atomgit:org/x")
    assert "do not match its vitport.json" in line


def test_a_no_weights_port_holding_weights_is_refused(hub, port, monkeypatch, capsys):
    data = json.loads((port / MANIFEST).read_text())
    data["weights_included"] = False
    (port / MANIFEST).write_text(json.dumps(data))
    assert "not included" in refused(monkeypatch, capsys, hub, str(port), "atomgit:org/x")


@pytest.mark.parametrize("target", ["org/x", "gitee:org/x", "atomgit:x", "hf:a/b/c", "ms:"])
def test_a_target_that_names_no_repository_is_refused(hub, port, monkeypatch, capsys, target):
    assert "atomgit:ORG/NAME" in refused(monkeypatch, capsys, hub, str(port), target)


# --- failures on the way: one line, exit 1 -------------------------------------------------


def test_an_unreachable_hub_is_one_line_exit_1(hub, port, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("VITPORT_ATOMGIT_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    code, _, err = cli(monkeypatch, capsys, "publish", str(port), "atomgit:org/x")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "could not publish 'org/x' to AtomGit" in lines[0]


def test_a_refused_upload_is_one_line_exit_1(hub, port, monkeypatch, capsys):
    hub.write_token = "someone else's"
    code, _, err = cli(monkeypatch, capsys, "publish", str(port), "atomgit:org/x")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1
    assert "refused the upload" in lines[0] and "VITPORT_ATOMGIT_TOKEN" in lines[0]
    hub.write_token = ATOMGIT_TOKEN
    hub.add("org/readonly", port.parent / "elsewhere", "readonly")
    (port.parent / "elsewhere").mkdir()
    code, _, err = cli(monkeypatch, capsys, "publish", str(port), "atomgit:org/readonly")
    assert code == 1 and "HTTP 403" in err and not hub.commits


# --- ModelScope: modelscope's HubApi, held to its real signatures ---------------------------


def test_modelscope_goes_through_hubapi_as_its_signatures_say(port, monkeypatch, tmp_path):
    from unittest import mock

    pytest.importorskip("modelscope")
    from modelscope.hub import api as ms_api

    from vitport.port.publish import publish

    fake = mock.create_autospec(ms_api.HubApi, instance=True)
    fake.endpoint = "https://modelscope.example"
    fake.upload_folder.return_value = {"commit": "ok"}
    made = []

    def hub_api(**kwargs):
        made.append(kwargs)
        return fake

    monkeypatch.setattr(ms_api, "HubApi", hub_api)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms_token")
    monkeypatch.setenv("VITPORT_CACHE", str(tmp_path / "cache"))
    result = publish(port, "ms:org/tiny", private=True, message="m")
    assert made == [{"token": "ms_token"}]
    fake.create_repo.assert_called_once()
    assert fake.create_repo.call_args.kwargs["visibility"] == "private"
    kwargs = fake.upload_folder.call_args.kwargs
    assert kwargs["folder_path"] == str(port) and kwargs["commit_message"] == "m"
    assert not Path(kwargs["tracker_path"]).is_relative_to(port)  # the port is left as it is
    assert result.url == "https://modelscope.example/models/org/tiny"
    assert set(result.uploaded) == set(package_files(port))
    fake.upload_folder.return_value = None  # modelscope: every file already committed
    assert publish(port, "ms:org/tiny").nothing_new


def test_modelscope_calls_bind_to_the_real_signatures():
    """The arguments vitport passes are ones the installed modelscope's methods take, down to
    the modelscope_hub method upload_folder hands them to."""
    import inspect

    pytest.importorskip("modelscope")
    from modelscope.hub.api import HubApi
    from modelscope_hub.api import HubApi as InnerHubApi

    inspect.signature(HubApi).bind(token="t")
    inspect.signature(HubApi.create_repo).bind(
        None, "org/x", token="t", visibility="private", exist_ok=True
    )
    forwarded = {
        "commit_message": "m",
        "revision": None,
        "use_cache": True,
        "tracker_path": "/tmp/t.json",
        "disable_tqdm": True,
    }
    inspect.signature(HubApi.upload_folder).bind(
        None, "org/x", folder_path="/tmp/p", token="t", **forwarded
    )
    inspect.signature(InnerHubApi.upload_folder).bind(
        None, repo_id="org/x", repo_type="model", folder_path="/tmp/p", **forwarded
    )
