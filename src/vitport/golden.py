"""The golden file: Features on disk, to compare against on another machine.

One safetensors file. Its tensors are the output groups and, with `infer --with-blocks`, the
hidden states at every block (``blocks/<point>``). Its header holds the grid, the image names and
the run's metadata as JSON (with each image's content hash, so that compare can match images by
their pixels), and for block states the points, the images that carry them and their dtype.
This module writes and reads all of it, and checks a file against the model it is compared with.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitport.device import dtype_name
from vitport.errors import GoldenMismatchError, VitportError
from vitport.format import count
from vitport.hooks import first_tensor, hooked_forward
from vitport.outputs import check_size, write_atomic

if TYPE_CHECKING:
    from vitport.device import Device
    from vitport.encoder import Encoder, Features
    from vitport.inputs import ImageProblem, LoadedImage

FORMAT_KEY = "vitport_features"  # the header entry that marks a vitport features file
FORMAT_VERSION = "1"
BLOCKS = "blocks/"  # the prefix of block states inside a golden file
EMBEDDINGS = "embeddings"
SOURCE = "path"  # the meta entry naming the golden file a reference was read from


# --- writing ---------------------------------------------------------------------------------


def write(
    path: str | Path,
    features: Features,
    extra: dict[str, torch.Tensor] | None = None,
    extra_header: dict[str, str] | None = None,
) -> Path:
    """Write a golden file: tensors as safetensors, everything else as JSON metadata.
    `extra` tensors (block states, named ``blocks/...``) go in the same file."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in features.groups().items()}
    tensors.update({k: v.contiguous() for k, v in (extra or {}).items()})
    header = {
        FORMAT_KEY: FORMAT_VERSION,
        "grid": json.dumps(list(features.grid)),
        "names": json.dumps(features.names),
        "meta": json.dumps(features.meta, sort_keys=True),
        **(extra_header or {}),
    }

    try:
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    except OSError as exc:
        raise VitportError(f"could not write {path}: {exc.strerror or exc}") from exc
    return path


def record_run(
    features: Features,
    skipped: Sequence[ImageProblem],
    image_sha256: Sequence[str],
    device: Device,
) -> None:
    """Note in `features` what a golden file carries beyond the outputs: the inputs that were
    skipped, each image's content hash and the device that ran."""
    features.meta["skipped"] = [[p.name, p.reason] for p in skipped]
    features.meta["image_sha256"] = image_sha256
    features.meta["device_description"] = device.describe()


# --- reading ---------------------------------------------------------------------------------


def read(path: str | Path, groups: Collection[str]) -> dict[str, Any]:
    """The fields of the Features in a golden file: the output `groups` it holds, the grid, the
    names and the metadata. Block states stay on disk (see GoldenBlocks)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise VitportError(f"features file {path} not found; write one with vitport infer --out")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            present = [k for k in f.keys() if k in groups]  # noqa: SIM118
            tensors = {k: f.get_tensor(k) for k in present}
    except Exception as exc:  # safetensors raises several unrelated types
        raise VitportError(f"{path} is not a safetensors features file ({exc})") from exc
    if header.get(FORMAT_KEY) != FORMAT_VERSION or "patches" not in tensors:
        raise VitportError(
            f"{path} is not a vitport features file; write one with vitport infer --out"
        )
    return {
        "grid": tuple(json.loads(header["grid"])),
        "names": json.loads(header["names"]),
        "meta": json.loads(header["meta"]),
        **tensors,
    }


def as_reference(features: Features, path: str | Path) -> Features:
    """`features`, read from the golden file `path`, as a reference for compare: it remembers
    the file, so that its block states can be read when localising."""
    features.meta[SOURCE] = str(path)
    return features


def source_of(reference: Features) -> str:
    """The golden file a reference was read from ("" when it was not marked as_reference)."""
    return str(reference.meta.get(SOURCE, ""))


# --- block states ----------------------------------------------------------------------------


def block_points(encoder: Encoder) -> list[str]:
    """The hook points a golden file stores: the embeddings' output, then every block's."""
    names = {id(m): n for n, m in encoder.module.named_modules()}
    return [EMBEDDINGS, *(names[id(b)] for b in encoder.blocks)]


def record_block_states(
    encoder: Encoder, pixel_batches: Iterable[torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every point's hidden states for every image, on the CPU: what `infer --with-blocks`
    stores, in the run's dtype unless `dtype` says otherwise."""
    points = block_points(encoder)
    kept: dict[str, list[torch.Tensor]] = {p: [] for p in points}
    keep_dtype = dtype or encoder.dtype

    def on_input(index: int, args: tuple, kwargs: dict) -> None:
        if index == 0:
            kept[EMBEDDINGS].append(first_tensor((args, kwargs)).detach().to("cpu", keep_dtype))

    def on_output(index: int, output: Any) -> None:
        kept[points[index + 1]].append(first_tensor(output).detach().to("cpu", keep_dtype))

    for pixels in pixel_batches:
        hooked_forward(encoder, pixels, on_input, on_output)
    return {BLOCKS + p: torch.cat(v) for p, v in kept.items()}


def block_states_bytes(encoder: Encoder, images: int, dtype: torch.dtype) -> int:
    """The size of the block states of `images` images at the encoder's input size."""
    h, w = encoder.image_size
    gh, gw = encoder.layout.grid(h, w)
    tokens = encoder.layout.num_prefix + gh * gw
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return len(block_points(encoder)) * images * tokens * encoder.arch.hidden_size * itemsize


def golden_file_parts(
    encoder: Encoder, images: Sequence[Any], batch_size: int, fp32: bool, max_bytes: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The block states of `images` (LoadedImages) and the header naming them, for a golden file;
    refused, with the estimate, beyond `max_bytes`."""
    dtype = torch.float32 if fp32 else encoder.dtype
    size = block_states_bytes(encoder, len(images), dtype)
    check_size(f"block states for {count(len(images), 'image')}", size, max_bytes)
    batches = (
        encoder.preprocess([im.image for im in images[i : i + batch_size]])
        for i in range(0, len(images), batch_size)
    )
    states = record_block_states(encoder, batches, dtype)
    header = {
        "block_points": json.dumps(block_points(encoder)),
        "block_images": json.dumps([im.name for im in images]),
        "block_dtype": dtype_name(dtype),
    }
    return states, header


@dataclass(frozen=True)
class GoldenBlocks:
    """The block states inside a golden file, read a slice at a time, never all at once."""

    path: str
    points: list[str]
    images: list[str]
    dtype: str

    @classmethod
    def open(cls, path: str | Any) -> GoldenBlocks | None:
        """None when the file holds no block states."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if "block_points" not in header:
            return None
        return cls(
            str(path),
            json.loads(header["block_points"]),
            json.loads(header["block_images"]),
            header.get("block_dtype", ""),
        )

    @property
    def parts(self) -> dict[int, dict[str, str]]:
        """A golden file holds block states only; the parts of an msprobe dump (DumpBlocks)."""
        return {}

    def read(self, point: str, start: int, stop: int) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            return f.get_slice(BLOCKS + point)[start:stop]


# --- checking a file against a model ---------------------------------------------------------


def check_golden(
    golden: Features, base: Encoder, images: Sequence[LoadedImage]
) -> list[LoadedImage]:
    """Refuse a golden file from another model, other preprocessing or other images."""
    meta, mine = golden.meta, base.meta()
    if meta.get("weights_sha256") != mine["weights_sha256"]:
        raise GoldenMismatchError(
            f"the golden file is from another model ({meta.get('spec')}, weights "
            f"{str(meta.get('weights_sha256'))[:12]}) than {base.spec} (weights "
            f"{mine['weights_sha256'][:12]}); write it with the same weights"
        )
    if meta.get("preprocess") != mine["preprocess"]:
        theirs, ours = meta.get("preprocess") or {}, mine["preprocess"]
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise GoldenMismatchError(
            f"the golden file used other preprocessing ({', '.join(diff)} differ: "
            f"{', '.join(f'{k}={theirs.get(k)!r} vs {ours.get(k)!r}' for k in diff[:2])}); "
            "use the same image_size=... and processor",
            params=("image_size=...",),
        )
    hashes = golden.meta.get("image_sha256")
    if hashes:
        return match_by_content(golden, hashes, images)
    names = [im.name for im in images]
    if list(golden.names) != names:
        missing = [n for n in golden.names if n not in names]
        extra = [n for n in names if n not in golden.names]
        detail = f"missing {missing[:3]}" if missing else f"not in it {extra[:3]}"
        raise GoldenMismatchError(
            f"the golden file holds other images ({len(golden.names)} there, {len(names)} here; "
            f"{detail}); pass the images it was written with, in the same order"
        )
    return list(images)


def match_by_content(
    golden: Features, hashes: Sequence[str], images: Sequence[LoadedImage]
) -> list[LoadedImage]:
    """The given images in the golden file's order, matched by the hash of their pixels: any
    directory, working directory or order will do; the same name with other pixels will not."""
    from vitport.inputs import content_sha256

    by_hash = {content_sha256(im.image): im for im in images}
    by_name = {im.name: im for im in images}
    ordered = []
    for name, digest in zip(golden.names, hashes, strict=True):
        if digest in by_hash:
            ordered.append(by_hash[digest])
            continue
        if name in by_name:
            raise GoldenMismatchError(
                f"image {name} is not the one the golden file was written with (other pixels "
                "under the same name); pass the original images"
            )
        raise GoldenMismatchError(
            f"the golden file's image {name} is not among the {len(images)} given here (matched "
            "by content, in any directory or order); pass the images it was written with"
        )
    return ordered


def golden_blocks(reference: Features, candidate: Encoder) -> GoldenBlocks | None:
    """The block states of a golden reference, checked against the candidate's hook points."""
    path = source_of(reference)
    blocks = GoldenBlocks.open(path) if path else None
    if blocks is None:
        return None
    mine = block_points(candidate)
    if blocks.points != mine:
        theirs_only = [p for p in blocks.points if p not in mine]
        mine_only = [p for p in mine if p not in blocks.points]
        raise GoldenMismatchError(
            f"the golden file's block states are at other hook points ({len(blocks.points)} there, "
            f"{len(mine)} here; only there: {theirs_only[:2]}, only here: {mine_only[:2]}); "
            "write it with the same model"
        )
    return blocks
