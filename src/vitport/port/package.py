"""`report --package`: a report's run written as a model repository that can be published as it
is, and that brings its own proof.

The repository holds the report (README.md headed by model-card metadata, report.json, the plots
and each step's JSON), the weights as loaded with their config and preprocessor config (unless
`include_weights=False`), the standalone `inference.py` that runs them (without weights, it asks
for the source's files beside it), `vitport.json` (the Manifest), the reference's golden file
with block states on the report's inputs, and `requirements.txt` with the versions that ran. It is built in
a temporary directory beside the target and moved into place only when complete.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitport.device import backend_packages, dtype_name
from vitport.encoder import Encoder, Features
from vitport.errors import VitportError, WeightsError
from vitport.outputs import OutputError, check_dir, is_report_dir, write_atomic
from vitport.port.manifest import GOLDEN, MANIFEST, Manifest, is_port
from vitport.port.standalone import SCRIPT, inference_script

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from vitport.compare.check import Source
    from vitport.inputs import LoadedImage
    from vitport.report.build import ReportRun

README = "README.md"
REQUIREMENTS = "requirements.txt"
PIPELINE_TAG = "image-feature-extraction"
GOLDEN_IMAGES = 16  # the golden file keeps the outputs of at most this many of the report's images
BLOCK_IMAGES = 4  # and the block states of the first of them
FP16_MAX = 65504.0  # block states beyond fp16's range are kept in bf16 instead


@dataclass(frozen=True)
class Package:
    """A written port: where it is, its manifest, and each file's size in bytes."""

    directory: Path
    manifest: Manifest
    files: dict[str, int]


def ours(directory: Path) -> bool:
    """A directory vitport wrote (a report or a port), which a new package may replace."""
    return is_port(directory) or is_report_dir(directory)


NO_DUMP = (
    "package=True writes the reference as a golden file; an msprobe dump cannot be one: "
    "report against a device or a golden file (vitport infer --out FILE --with-blocks)"
)


def check_reference(source: Source) -> None:
    """Before the run: a package carries its reference as a golden file, which a device or a
    golden file gives and an msprobe dump does not."""
    from vitport.msprobe import Dump

    if isinstance(source, Dump):
        raise VitportError(NO_DUMP, params=("package=True",))


def write_package(
    run: ReportRun,
    directory: str | Path,
    lang: str = "en",
    *,
    include_weights: bool = True,
    allow_fail: bool = False,
    overwrite: bool = False,
) -> Package:
    """Write the port of a report's run into `directory`, all at once: a reader (or a failure)
    never sees a half-written package. `directory` must be new or empty, or `overwrite` must say
    to write into it: a report or port vitport wrote is then replaced whole, a directory that
    holds other files keeps them beside the package's."""
    from vitport.report import write_report

    directory = Path(directory).expanduser().resolve()
    check_dir(directory, "directory", overwrite, ours)

    def fill(tmp: Path) -> Manifest:
        tmp.mkdir(parents=True)
        manifest = build_manifest(run, include_weights, allow_fail, lang)
        (tmp / SCRIPT).write_text(inference_script(run.base, manifest))
        if include_weights:
            write_weights(run, tmp)
        inputs = write_golden(run, tmp / GOLDEN)
        manifest = replace(manifest, inputs_sha256=tuple(inputs))
        write_report(run.data, tmp, lang)
        (tmp / REQUIREMENTS).write_text(requirements(manifest))
        manifest.write(tmp)
        write_card(tmp, manifest, run.data, run.base)
        return manifest

    try:
        if not directory.exists() or not any(directory.iterdir()) or ours(directory):
            manifest = write_atomic(directory, fill)
        else:  # overwrite=True into a directory that holds other files: keep them
            hidden = f".{directory.name}.tmp-"
            with tempfile.TemporaryDirectory(prefix=hidden, dir=directory.parent) as staging:
                built = Path(staging) / "port"
                manifest = fill(built)
                for path in sorted(built.iterdir()):
                    write_atomic(directory / path.name, lambda tmp, p=path: shutil.move(p, tmp))
    except OSError as exc:
        raise OutputError(
            f"could not write the package {directory}: {exc.strerror or exc}"
        ) from exc
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    return Package(directory, manifest, files)


# --- the manifest ----------------------------------------------------------------------------


def build_manifest(run: ReportRun, include_weights: bool, allow_fail: bool, lang: str) -> Manifest:
    """vitport.json's record of a report's run (the golden file's input hashes come later)."""
    from vitport.runtimes.base import Setup

    data, base = run.data, run.base
    command, compare = data["command"], data["compare"]
    setup = Setup(dtype=command["dtype"], fixes=tuple(command["fixes"]))
    reference = compare["reference"]
    return Manifest(
        source=command["spec"],
        weights_sha256=base.weights_sha256,
        weights_included=include_weights,
        family=base.family,
        device_type=data["environment"].get("type", command["device"].split(":")[0]),
        dtype=setup.dtype,
        fixes=setup.fixes,
        runtime=setup.runtime,
        attention=setup.attention,
        image_size=tuple(data["model"]["image_size"]),
        limits=tuple(compare["thresholds"]),
        verdict={"passed": bool(compare["passed"]), "checks": compare["verdict"]["checks"]},
        allow_fail=allow_fail,
        environment={k: str(v) for k, v in data["environment"].items()},
        vitport_version=data["vitport_version"],
        created=data["created"],
        lang=lang,
        reference={k: reference.get(k, "") for k in ("kind", "device", "dtype")},
    )


# --- the weights -----------------------------------------------------------------------------


def write_weights(run: ReportRun, directory: Path) -> None:
    """The weights as loaded, with their config and preprocessor config, in the layout they were
    loaded from; loaded back, they must hash to the same sha256."""
    import vitport
    from vitport.convert.layouts import (
        loaded_arch,
        loaded_preprocessing,
        loaded_state,
        write_checkpoint,
    )

    base, size = run.base, run.options.image_size
    if base.family == "timm":
        arch, recipe = loaded_arch(base), loaded_preprocessing(base)
        write_checkpoint(directory, "timm", arch, loaded_state(base), recipe)
    else:  # transformers' own writer keeps every family's config and tensors exactly
        from vitport.families.hf import quiet_transformers

        with quiet_transformers():
            base.module.save_pretrained(str(directory))
        processor = source_dir(base.spec, base) / "preprocessor_config.json"
        if size is None and processor.is_file():
            shutil.copyfile(processor, directory / processor.name)
        else:
            loaded_preprocessing(base).hf_processor().save_pretrained(str(directory))
    again = vitport.load(str(directory), image_size=size)
    if again.weights_sha256 != base.weights_sha256:
        raise WeightsError(
            f"the weights written for {base.spec} load back with another sha256 "
            f"({again.weights_sha256[:12]}… against {base.weights_sha256[:12]}…); package it "
            "with include_weights=False",
            params=("include_weights=False",),
        )
    if again.preprocess.describe() != base.preprocess.describe():
        raise WeightsError(
            f"the preprocessor config written for {base.spec} loads back as other preprocessing; "
            "package it with include_weights=False",
            params=("include_weights=False",),
        )


def source_dir(spec: str, base: Encoder) -> Path:
    """The directory the weights were read from ("" where there is none, as for timm names)."""
    if spec.startswith("demo:"):
        from vitport.families.demo import demo_checkpoint_dir

        return Path(demo_checkpoint_dir(spec.removeprefix("demo:")))
    path = Path(base.source)
    return path if path.is_dir() else Path("")


# --- the golden file -------------------------------------------------------------------------


def write_golden(run: ReportRun, path: Path) -> list[str]:
    """The reference's golden file on the report's inputs, with block states in 16 bits; the
    content hashes of its images. A golden-file reference is the reference: it is copied."""
    from vitport.golden import source_of
    from vitport.msprobe import is_dump_reference

    reference = run.check.reference
    if isinstance(reference, Features) and is_dump_reference(reference):
        raise VitportError(NO_DUMP, params=("package=True",))
    if isinstance(reference, Features):
        shutil.copyfile(source_of(reference), path)
        return [str(h) for h in reference.meta.get("image_sha256", [])]
    images: Sequence[LoadedImage] = run.check.inputs  # type: ignore[assignment]
    return record_golden(reference, images[:GOLDEN_IMAGES], path)


def record_golden(reference: Encoder, images: Sequence[LoadedImage], path: Path) -> list[str]:
    """Run `reference` on `images` into a golden file at `path`, with the block states of the
    first BLOCK_IMAGES in fp16 (bf16 where a state exceeds fp16's range)."""
    from vitport.golden import golden_file_parts, record_run
    from vitport.infer import infer

    result = infer(reference, images, batch_size=BLOCK_IMAGES)
    features = result.features
    record_run(features, [], result.content_sha256, reference.device)
    chosen = images[:BLOCK_IMAGES]
    states, header = golden_file_parts(reference, chosen, BLOCK_IMAGES, True, 1 << 34)
    wide = any(t.abs().max().item() > FP16_MAX for t in states.values() if t.numel())
    half = torch.bfloat16 if wide else torch.float16
    states = {k: v.to(half) for k, v in states.items()}
    header["block_dtype"] = dtype_name(half)
    features.save(path, states, header)
    return list(result.content_sha256)


# --- requirements ----------------------------------------------------------------------------


def requirements(manifest: Manifest) -> str:
    """The versions the report ran, as pip pins (without a local tag such as +cu130)."""
    library = "timm" if manifest.family == "timm" else "transformers"
    names = ["torch", *backend_packages(manifest.device_type), library]
    names += ["safetensors", "pillow", "numpy"]
    lines = []
    for name in names:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        lines.append(f"{name}=={version.split('+')[0]}")
    return "\n".join(lines) + "\n"


# --- the model card --------------------------------------------------------------------------

LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")


def hub_id(spec: str) -> str | None:
    """The Hugging Face hub id the weights come from, where they have one."""
    from vitport.families.sources import HUB_ID

    if spec.startswith("hf:"):
        return spec.removeprefix("hf:")
    if spec.startswith("timm:"):
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.removeprefix("timm:"))
        return getattr(cfg, "hf_hub_id", None) or None
    if ":" not in spec and HUB_ID.match(spec) and not Path(spec).expanduser().exists():
        return spec
    return None


def source_license(spec: str, base: Encoder) -> str | None:
    """The license the source declares (its model card, config, or vitport's demo record, or
    timm's pretrained config); None where it declares none that can be read."""
    if spec.startswith("timm:"):
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.removeprefix("timm:"))
        return getattr(cfg, "license", None) or None
    where = source_dir(spec, base)
    if str(where) not in ("", "."):
        found = _declared_license(where)
        if found:
            return found
    return _hub_card_license(spec)


def _declared_license(directory: Path) -> str | None:
    from huggingface_hub import ModelCard

    readme = directory / README
    if readme.is_file():
        try:
            license_ = ModelCard.load(readme).data.license
        except Exception:  # a README that is no model card declares nothing
            license_ = None
        if license_:
            return str(license_)
    for name, keys in (("config.json", ("license",)), ("demo.json", ("source", "license"))):
        try:
            value: Any = json.loads((directory / name).read_text())
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
        except (OSError, ValueError):
            value = None
        if isinstance(value, str) and value:
            return value
    return None


def _hub_card_license(spec: str) -> str | None:
    """The license in a Hugging Face hub repository's README (the weights' download does not
    fetch it); None offline, and for other hubs."""
    from vitport.families.sources import HF_HUB, HUB_ID

    repo_id = spec.removeprefix("hf:")
    if ":" in repo_id or not HUB_ID.match(repo_id) or Path(repo_id).expanduser().exists():
        return None
    try:
        from huggingface_hub import hf_hub_download

        with HF_HUB.transfers():
            path = hf_hub_download(repo_id, README, endpoint=HF_HUB.endpoint)
    except Exception:  # offline, or no README: the license is not known
        return None
    return _declared_license(Path(path).parent)


def card_data(manifest: Manifest, base_model: str | None, license_: str | None) -> Any:
    """The card's metadata: what the port is, for the hub's search and widgets."""
    from huggingface_hub import ModelCardData

    family = manifest.family.split("/")[-1]
    extra: dict[str, Any] = {}
    if license_:
        name = license_.strip().lower()
        if LICENSE_ID.match(name):
            extra["license"] = name
        else:  # the hub takes identifiers only; the source's own words go beside "other"
            extra.update(license="other", license_name=license_.strip())
    return ModelCardData(
        base_model=base_model,
        library_name="timm" if manifest.family == "timm" else "transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=sorted({manifest.device_type, family, "vitport"}),
        **extra,
    )


def write_card(
    directory: Path,
    manifest: Manifest | None = None,
    data: dict[str, Any] | None = None,
    base: Encoder | None = None,
) -> ModelCard:
    """README.md of the port in `directory`: the report in the seeds' sections (as write_report
    rendered it, in the manifest's language), headed by its model-card metadata; a FAIL verdict
    packaged with allow_fail is stated under the title. Reads vitport.json and report.json where
    not given, so publish can write it again after changing allow_fail."""
    from huggingface_hub import ModelCard

    from vitport.port.manifest import read_manifest
    from vitport.report import read_report
    from vitport.report.plots import PLOTS
    from vitport.report.render import render
    from vitport.report.strings import STRINGS

    manifest = manifest or read_manifest(directory)
    if manifest is None:
        raise VitportError(
            f"{directory} holds no {MANIFEST}; write it with vitport report --package"
        )
    data = data or read_report(directory)
    plots = {name: file for name, (file, _) in PLOTS.items() if (directory / file).is_file()}
    body = render(data, manifest.lang, plots)
    if manifest.allow_fail and not manifest.passed:
        title, rest = body.split("\n", 1)
        body = f"{title}\n\n> {STRINGS[manifest.lang]['allow_fail']}\n{rest}"
    spec = manifest.source
    license_ = source_license(spec, base) if base is not None else _license_of(directory)
    metadata = card_data(manifest, hub_id(spec), license_)
    card = ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{body}")
    card.save(directory / README)
    return card


def _license_of(directory: Path) -> str | None:
    """The license an earlier card of this port recorded."""
    from huggingface_hub import ModelCard

    try:
        found = ModelCard.load(directory / README).data
    except Exception:
        return None
    if found.license == "other":
        return found.get("license_name")
    return found.license
