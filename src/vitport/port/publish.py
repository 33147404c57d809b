"""`vitport publish`: a packaged port onto AtomGit, the Hugging Face hub or ModelScope.

Everything that can be refused is checked before anything is sent, each as one line with exit
2: a directory that is not a port, a FAIL verdict without `allow_fail`, a missing token, weights
that no longer hash to the manifest's sha256. An unreachable hub or a refused upload is one line
with exit 1.

A FAIL port published with `allow_fail` must say so in its card. Where the packaging did not
(`Manifest.allow_fail` false: `report --package` packages a FAIL run as it is), publish amends
the port in place before it uploads: `allow_fail` goes into vitport.json and the card is written
again by the packaging's own `write_card`, which states the FAIL verdict under its title; the
directory and the repository then say the same.

AtomGit and the Hugging Face hub go through huggingface_hub (`create_repo`, `upload_folder`);
AtomGit with its own endpoint and token, Xet off, ids and default branch as AtomGit's client
has them (`vitport.families.sources`). ModelScope goes through `modelscope`'s `HubApi`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vitport import records
from vitport.errors import PublishError, SpecError, VitportError, WeightsError, one_line
from vitport.port.manifest import MANIFEST, WEIGHTS, Manifest, check_weights, read_manifest

MODELSCOPE_TOKEN = "MODELSCOPE_API_TOKEN"  # the variable modelscope itself reads
HF_TOKEN = "HF_TOKEN"
TARGETS = "atomgit:ORG/NAME, hf:ORG/NAME or ms:ORG/NAME"


@dataclass(frozen=True)
class Published:
    """What a publish did: where the port is, and what went up."""

    target: str  # as the user wrote it
    hub: str  # the hub's name
    repo_id: str  # the hub's own id for it (AtomGit's three-part ids are rewritten)
    url: str
    revision: str
    commit: str | None  # the head commit after publishing (None where the hub does not say)
    uploaded: tuple[str, ...]  # files new or changed on the hub; () = nothing new
    unchanged: tuple[str, ...]  # files the hub already held as they are
    allow_fail: bool = False  # published although its verdict is FAIL
    amended: bool = False  # its card and vitport.json were made to state the FAIL verdict

    @property
    def nothing_new(self) -> bool:
        return not self.uploaded

    def to_dict(self) -> dict[str, Any]:
        return records.to_dict(self)


@dataclass(frozen=True)
class Upload:
    """What goes up, checked: the port, where to, with which token, and how."""

    directory: Path
    target: str  # as the user wrote it
    prefix: str  # "atomgit:", "hf:" or "ms:"
    user_id: str  # the repository id as written
    token: str
    files: tuple[str, ...]  # the port's files, repository paths
    private: bool
    revision: str | None
    message: str
    manifest: Manifest

    def published(self, **facts: Any) -> Published:
        """The record of this upload, from what the hub answered."""
        uploaded = facts["uploaded"]
        unchanged = tuple(name for name in self.files if name not in uploaded)
        allow_fail = not self.manifest.passed
        return Published(target=self.target, unchanged=unchanged, allow_fail=allow_fail, **facts)


def publish(
    directory: str | Path,
    target: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    allow_fail: bool = False,
) -> Published:
    """Create the target repository if it is missing and upload the port in `directory` to it;
    a file the hub already holds as it is goes up again never."""
    prefix, user_id = parse_target(target)
    directory = Path(directory)
    manifest = check_package(directory, allow_fail)
    token = hub_token(prefix)
    check_package_weights(directory, manifest)
    amended = not manifest.passed and not manifest.allow_fail
    if amended:
        manifest = state_allow_fail(directory, manifest)
    upload = Upload(
        directory=directory,
        target=target,
        prefix=prefix,
        user_id=user_id,
        token=token,
        files=tuple(package_files(directory)),
        private=private,
        revision=revision,
        message=message or default_message(manifest),
        manifest=manifest,
    )
    published = _publish_modelscope(upload) if prefix == "ms:" else _publish_hf_api(upload)
    return replace(published, amended=amended)


def parse_target(target: str) -> tuple[str, str]:
    """('atomgit:' | 'hf:' | 'ms:', the repository id as written)."""
    prefix = next((p for p in ("atomgit:", "hf:", "ms:") if target.startswith(p)), None)
    if prefix is None:
        raise SpecError(f"cannot publish to '{target}'; the target is {TARGETS}")
    user_id = target.removeprefix(prefix)
    parts = user_id.split("/")
    three_parts = prefix == "atomgit:" and len(parts) == 3
    if not (len(parts) == 2 or three_parts) or not all(parts):
        raise SpecError(f"'{target}' names no repository; the target is {TARGETS}")
    return prefix, user_id


def check_package(directory: Path, allow_fail: bool) -> Manifest:
    """The port's manifest, or a refusal: not a port; a FAIL verdict without `allow_fail`."""
    if not directory.is_dir():
        raise VitportError(
            f"{directory} is not a directory; pass a port written by vitport report --package"
        )
    manifest = read_manifest(directory)
    if manifest is None:
        raise VitportError(
            f"{directory} is not a vitport port (no {MANIFEST}); write one with vitport report "
            "--package, then publish that directory"
        )
    if not manifest.passed and not allow_fail:
        raise VitportError(
            f"the port in {directory} failed its check (verdict FAIL); fix it and package it "
            "again, or publish it as failed with allow_fail=True (its card then says so)",
            params=("allow_fail=True",),
        )
    return manifest


def state_allow_fail(directory: Path, manifest: Manifest) -> Manifest:
    """Make a FAIL port say it is published anyway: allow_fail in its vitport.json, and its card
    written again by the packaging, which states the FAIL verdict under the title."""
    from vitport.port.package import write_card

    manifest = replace(manifest, allow_fail=True)
    manifest.write(directory)
    write_card(directory, manifest)
    return manifest


def hub_token(prefix: str) -> str:
    """The token for the hub, from its own variable; refused in one line where it is missing.
    AtomGit is never sent the Hugging Face token."""
    if prefix == "atomgit:":
        from vitport.families.sources import ATOMGIT

        token = os.environ.get(ATOMGIT.token_env)
        if not token:
            raise VitportError(
                f"publishing to AtomGit needs a token: set {ATOMGIT.token_env} to an AtomGit "
                "access token with write access"
            )
        return token
    if prefix == "ms:":
        token = os.environ.get(MODELSCOPE_TOKEN)
        if not token:
            raise VitportError(
                f"publishing to ModelScope needs a token: set {MODELSCOPE_TOKEN} to a ModelScope "
                "access token"
            )
        return token
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise VitportError(
            f"publishing to the Hugging Face hub needs a token: set {HF_TOKEN} to a write "
            "token, or run `hf auth login`"
        )
    return token


def check_package_weights(directory: Path, manifest: Manifest) -> None:
    """Weights in the port must hash to the manifest's sha256 (as loaded, fp32); a port that
    records none (--no-weights) must hold none."""
    from vitport.families.weights import WEIGHT_FILES

    held = [name for name in (WEIGHTS, *WEIGHT_FILES) if (directory / name).is_file()]
    if not manifest.weights_included:
        if held:
            raise WeightsError(
                f"{directory} holds {held[0]} but its {MANIFEST} says the weights are not "
                "included (--no-weights); remove the file or package the port again"
            )
        return
    if not held:
        raise WeightsError(
            f"{directory} has no {WEIGHTS} although its {MANIFEST} says it includes the "
            "weights; package the port again with vitport report --package"
        )
    check_weights(manifest, port_weights_sha256(directory), str(directory))


def port_weights_sha256(directory: Path) -> str:
    """The sha256 of the port's weights as loaded (fp32, CPU), as the manifest records it."""
    import vitport

    # hashed before any dtype; the port's own dtype and fixes are not needed for it
    return vitport.load(str(directory), "cpu", "fp32", fixes=()).weights_sha256


def default_message(manifest: Manifest) -> str:
    verdict = "PASS" if manifest.passed else "FAIL (published with --allow-fail)"
    return (
        f"vitport port of {manifest.source} for {manifest.device_type} ({manifest.dtype}), "
        f"verdict {verdict}"
    )


def package_files(directory: Path) -> list[str]:
    """The port's files as upload_folder sends them (never .git or .cache), repository paths."""
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and not {".git", ".cache"} & set(p.relative_to(directory).parts)
    )


# --- AtomGit and the Hugging Face hub: huggingface_hub -------------------------------------


def _publish_hf_api(up: Upload) -> Published:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from vitport.families.sources import ATOMGIT, HF_HUB, default_branch

    hub = ATOMGIT if up.prefix == "atomgit:" else HF_HUB
    repo_id = hub.repo_id(up.user_id)
    api = HfApi(endpoint=hub.endpoint, token=up.token)
    where = f"{hub.name} at {api.endpoint}"
    try:
        with hub.transfers():
            url = str(api.create_repo(repo_id, private=up.private, exist_ok=True))
            branch = up.revision or (default_branch(repo_id, hub) if hub.atomgit else "main")
            if up.revision:
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            try:  # what the branch holds now, to tell what goes up
                before = api.model_info(repo_id, revision=branch, files_metadata=True)
                head, held = before.sha, {s.rfilename: s for s in before.siblings or ()}
            except HfHubHTTPError:  # no first commit yet, or a hub that does not say
                head, held = None, {}
            changed = [n for n in up.files if not _same(up.directory / n, held.get(n))]
            commit = api.upload_folder(
                folder_path=str(up.directory),
                repo_id=repo_id,
                revision=branch,
                commit_message=up.message,
            )
    except VitportError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreachable, refused, malformed: one line, exit 1
        raise _upload_error(exc, up.user_id, where, hub.token_env or HF_TOKEN) from exc
    return up.published(
        hub=hub.name,
        repo_id=repo_id,
        url=url,
        revision=branch,
        commit=commit.oid,
        uploaded=() if commit.oid == head else tuple(changed),
    )


def _same(path: Path, held: Any) -> bool:
    """Whether the hub holds `path` as it is (its entry from the revision info with blobs)."""
    if held is None:
        return False
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    if held.lfs is not None:
        with path.open("rb") as f:
            return sha_fileobj(f).hex() == held.lfs.sha256
    return held.blob_id == git_hash(path.read_bytes())


def _upload_error(exc: Exception, user_id: str, where: str, token_env: str) -> PublishError:
    from huggingface_hub.errors import HfHubHTTPError

    response = getattr(exc, "response", None) if isinstance(exc, HfHubHTTPError) else None
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        return PublishError(
            f"{where} refused the upload to '{user_id}' (HTTP {status}); check that {token_env} "
            "is a token with write access to it"
        )
    if status is not None:
        return PublishError(
            f"{where} refused the upload to '{user_id}' (HTTP {status}: "
            f"{one_line(_server_message(exc), limit=120)}); nothing was published"
        )
    return PublishError(
        f"could not publish '{user_id}' to {where} ({one_line(exc, typed=True, limit=120)}); "
        "check the address and the network, then publish again"
    )


def _server_message(exc: Exception) -> str:
    server = getattr(exc, "server_message", None)
    return server or str(exc)


# --- ModelScope: modelscope's HubApi --------------------------------------------------------


def _publish_modelscope(up: Upload) -> Published:
    try:
        from modelscope.hub.api import HubApi
    except ImportError as exc:
        raise SpecError(
            "publishing to ModelScope needs it: pip install 'vitport[modelscope]'"
        ) from exc
    from vitport.cache import cache_root

    # modelscope remembers what it committed (size and time of each file); kept outside the
    # port, so the port's directory is left as it is
    repo_id, token = up.user_id, up.token
    tracker = cache_root() / "publish" / "modelscope" / f"{repo_id.replace('/', '--')}.json"
    tracker.parent.mkdir(parents=True, exist_ok=True)
    try:
        api = HubApi(token=token)
        api.create_repo(
            repo_id, token=token, visibility="private" if up.private else "public", exist_ok=True
        )
        result = api.upload_folder(
            repo_id,
            folder_path=str(up.directory),
            token=token,
            commit_message=up.message,
            revision=up.revision,
            use_cache=True,
            tracker_path=str(tracker),
            disable_tqdm=True,
        )
    except Exception as exc:  # noqa: BLE001 - modelscope wraps its errors in many types
        raise PublishError(
            f"could not publish '{repo_id}' to ModelScope ({one_line(exc, typed=True, limit=120)}); "
            f"check {MODELSCOPE_TOKEN} and the network, then publish again"
        ) from exc
    return up.published(
        hub="ModelScope",
        repo_id=repo_id,
        url=f"{str(api.endpoint).rstrip('/')}/models/{repo_id}",
        revision=up.revision or "master",
        commit=None,
        uploaded=tuple(up.files) if result else (),  # None: every file was already committed
    )
