"""Binding a dump to an Encoder: its first module's input gives the pixel batches, its block and
part records the states localisation teacher-forces on, and its final-norm output the
reference tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vitport.device import dtype_name, parse_dtype
from vitport.errors import GoldenMismatchError, VitportError
from vitport.golden import EMBEDDINGS, SOURCE
from vitport.hooks import hooked, replace_first_tensor
from vitport.msprobe.read import FORMAT, Dump

if TYPE_CHECKING:
    from vitport.encoder import Encoder, Features


@dataclass
class DumpBlocks:
    """A dump's block states, bound to an Encoder's hook points: the interface of GoldenBlocks
    (points, images, dtype, read), plus each block's parts where the dump has them."""

    dump: Dump
    points: list[str]  # EMBEDDINGS, then the Encoder's block names
    images: list[str]
    dtype: str
    path: str
    prefix: tuple[str, str]  # (the dump's path prefix, the Encoder's) that map one onto the other
    final: str | None  # the Encoder's name of the final norm, where the dump holds its output
    parts: dict[int, dict[str, str]] = field(default_factory=dict)  # block -> kind -> name
    sizes: list[int] = field(default_factory=list)  # rows of each forward call

    def dump_path(self, name: str) -> str:
        theirs, mine = self.prefix
        return theirs + name[len(mine) :]

    def rows(self, name: str, which: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of module `name`'s input or output, over all its calls."""
        pieces, offset = [], 0
        for call, size in zip(self.dump.calls[self.dump_path(name)], self.sizes, strict=True):
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                record = call.input() if which == "input" else call.output()
                pieces.append(self.dump.tensor(record)[lo - offset : hi - offset])
            offset += size
        return torch.cat(pieces)

    def read(self, point: str, start: int, stop: int) -> torch.Tensor:
        if point == EMBEDDINGS:
            return self.rows(self.points[1], "input", start, stop)
        return self.rows(point, "output", start, stop)

    def tokens(self, start: int, stop: int) -> torch.Tensor:
        """The reference tokens: the final norm's output, or the last block's."""
        return self.rows(self.final or self.points[-1], "output", start, stop)


def bind(dump: Dump, encoder: Encoder, check_weights: bool = True) -> DumpBlocks:
    """Map the dump's modules onto the Encoder's, refusing a dump of another model with the
    first difference: the block class, the block count, the names, the hidden size, the weights."""
    names = {id(m): n for n, m in encoder.module.named_modules()}
    mine = [names[id(b)] for b in encoder.blocks]
    cls = type(encoder.blocks[0]).__name__
    theirs = [p for p in dump.order if dump.calls[p][0].cls == cls]
    if not theirs:
        found = sorted({dump.calls[p][0].cls for p in dump.order})
        raise GoldenMismatchError(
            f"the msprobe dump has no {cls} modules, the blocks of {encoder.spec} (its modules: "
            f"{', '.join(found[:6])}); dump the same model"
        )
    if len(theirs) != len(mine):
        raise GoldenMismatchError(
            f"the msprobe dump has {len(theirs)} {cls} blocks, {encoder.spec} has {len(mine)}; "
            "dump the same model"
        )
    if theirs[0].endswith(mine[0]):
        prefix = (theirs[0][: len(theirs[0]) - len(mine[0])], "")
    elif mine[0].endswith(theirs[0]):
        prefix = ("", mine[0][: len(mine[0]) - len(theirs[0])])
    else:
        prefix = ("", "")
    for dumped, own in zip(theirs, mine, strict=True):
        if prefix[0] + own[len(prefix[1]) :] != dumped:
            raise GoldenMismatchError(
                f"the msprobe dump's block {dumped} is {own} in {encoder.spec}: the module names "
                "differ; dump the same model"
            )
    batches = len(dump.calls[theirs[0]])
    first_out = dump.calls[theirs[0]][0].output() or {}
    hidden = (first_out.get("shape") or [0])[-1]
    if hidden != encoder.arch.hidden_size:
        raise GoldenMismatchError(
            f"the msprobe dump's blocks are {hidden} wide, {encoder.spec} has hidden size "
            f"{encoder.arch.hidden_size}; dump the same model"
        )
    pixels = dump.calls[dump.order[0]]
    sizes = [int((c.input() or {}).get("shape", [0])[0]) for c in pixels]
    if len(sizes) != batches:
        raise VitportError(
            f"the msprobe dump holds {len(sizes)} calls of its first module but {batches} of its "
            "blocks; dump whole forward calls"
        )
    dtype = dtype_name(parse_dtype(str(first_out.get("dtype", "torch.float32"))))
    blocks = DumpBlocks(
        dump,
        [EMBEDDINGS, *mine],
        dump.pixel_inputs().names,
        dtype,
        str(dump.folder),
        prefix,
        None,
        sizes=sizes,
    )
    final = names[id(encoder.final_norm)] if encoder.final_norm is not None else None
    if final is not None and len(dump.calls.get(blocks.dump_path(final), [])) == batches:
        blocks.final = final
    for index in range(len(mine)):
        found = {kind: names[id(m)] for kind, m in encoder.block_parts(index).items()}
        found = {
            k: n
            for k, n in found.items()
            if len(dump.calls.get(blocks.dump_path(n), [])) == batches
        }
        if found:
            blocks.parts[index] = found
    if check_weights:
        _check_weights(blocks, encoder)
    return blocks


def _check_weights(blocks: DumpBlocks, encoder: Encoder, limit: int = 4) -> None:
    """The first parameters the dump recorded equal the Encoder's, in the dump's dtype."""
    theirs_prefix, mine_prefix = blocks.prefix
    modules = dict(encoder.module.named_modules())
    checked = 0
    for path in blocks.dump.order:
        params = blocks.dump.calls[path][0].record.get("parameters") or {}
        name = mine_prefix + path[len(theirs_prefix) :]
        if not path.startswith(theirs_prefix) or name not in modules:
            continue
        for param, record in params.items():
            own = getattr(modules[name], param, None)
            if not isinstance(record, dict) or "data_name" not in record:
                continue
            if not isinstance(own, torch.Tensor):
                continue
            dumped = blocks.dump.tensor(record).float()
            local = own.detach().to("cpu", blocks.dump.tensor(record).dtype).float()
            if dumped.shape != local.shape:
                raise GoldenMismatchError(
                    f"the msprobe dump's {path}.{param} is {list(dumped.shape)}, {encoder.spec}'s "
                    f"is {list(local.shape)}; dump the same model"
                )
            scale = float(local.abs().max()) if local.numel() else 0.0
            diff = float((dumped - local).abs().max()) if local.numel() else 0.0
            if diff > 1e-2 * scale + 1e-6:
                raise GoldenMismatchError(
                    f"the msprobe dump's {path}.{param} differs from {encoder.spec}'s by up to "
                    f"{diff:.3g} (of {scale:.3g}): other weights; dump the same checkpoint"
                )
            checked += 1
            if checked >= limit:
                return


def reference_features(blocks: DumpBlocks, base: Encoder) -> Features:
    """The dump's outputs as Features: its tokens put in place of the base model's own at the
    final norm (or the last block), so pooled and logits follow from them as the family computes
    them. Marked as a dump, with its dtype."""
    inputs = blocks.dump.pixel_inputs()
    point = base.final_norm if blocks.final else base.blocks[-1]
    parts, start = [], 0
    for pixels in inputs.batches:
        stop = start + len(pixels)
        tokens = blocks.tokens(start, stop).to(base.device.torch_device, base.dtype)

        def put(_m: nn.Module, _args: tuple, _kwargs: dict, output: Any, tokens=tokens) -> Any:
            return replace_first_tensor(output, tokens)

        with hooked([(point, put)]), torch.inference_mode():
            raw = base.forward_fn(base.module, pixels.to(base.device.torch_device, base.dtype))
        parts.append(
            base.split(raw, pixels.shape[-2:], inputs.names[start:stop]).to("cpu", torch.float32)
        )
        start = stop
    from vitport.encoder import Features

    features = Features.concat(parts)
    features.meta.update(
        format=FORMAT,
        device=f"msprobe dump ({blocks.dump.level})",
        dtype=blocks.dtype,
        device_description={
            "source": "msprobe dump",
            "level": blocks.dump.level,
            "path": str(blocks.dump.folder),
        },
    )
    features.meta[SOURCE] = str(blocks.dump.folder)
    return features


def is_dump_reference(reference: Features) -> bool:
    return reference.meta.get("format") == FORMAT
