"""Rich tables for `vitport infer`: output shapes, and each image's size, latency and values."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table


def shapes_table(spec: str, encoder, features) -> Table:
    """infer: the shape of each output."""
    h, w = encoder.image_size
    table = Table(
        title=f"{escape(spec)} on {encoder.device} ({features.meta['dtype']}), {h}x{w} input"
    )
    table.add_column("output")
    table.add_column("shape")
    for name, shape in features.shapes().items():
        table.add_row(name, " x ".join(map(str, shape)))
    return table


def per_image_table(result) -> Table:
    """infer: size, latency and the first pooled values of each image."""
    feats = result.features
    table = Table(title="per image")
    latency = latency_header(result)
    for column in ("image", "size", latency, "pooled[:4]"):
        table.add_column(column, justify="right" if column == latency else "left")
    pooled = feats.pooled if feats.pooled is not None else feats.patches.mean(1)
    for i, name in enumerate(feats.names):
        ow, oh = result.original_sizes[i]
        values = " ".join(f"{v:+.3f}" for v in pooled[i][:4].tolist())
        table.add_row(escape(name), f"{ow}x{oh}", f"{result.per_image_ms[i]:.1f}", values)
    return table


def _batched(result) -> bool:
    return any(n > 1 for n in result.batch_sizes)


def latency_header(result) -> str:
    """infer's latency column: per image, and a share of its batch when batches hold more."""
    return "ms/image (batch ÷ n)" if _batched(result) else "ms/image"


def latency_note(result, load_seconds: float) -> str:
    """infer's footer: what the latency column is, and the first call (a whole batch)."""
    first = f"{result.first_call_ms:.1f} ms"
    if _batched(result):
        n = result.batch_sizes[0]
        return (
            "ms/image is each batch's device time (synchronised) divided by its n images; the "
            f"first call, a batch of {n}, took {first} with warm-up and kernel selection. "
            f"Load took {load_seconds:.1f} s."
        )
    return (
        f"ms/image is device time (synchronised); the first call ({first}) includes warm-up "
        f"and kernel selection. Load took {load_seconds:.1f} s."
    )
