"""`embed --engine ray`: the same pipeline on Ray Data. Reading tasks decode and preprocess,
actors that hold the model encode (GPUs through `num_gpus`, Ascend NPUs through Ray's `NPU`
resource), and the driver writes the same shards through the same store, so the output
contract, the errors table and resuming are those of the local engine."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vitport.embed.shards import ShardCollector, Timing, features_of
from vitport.embed.store import Store
from vitport.encoder import Encoder
from vitport.errors import VitportError
from vitport.stream import Failure, ImageInputs, Input


class Decode:
    """A reading task: inputs to pixels, a failed input to a zero image and its reason."""

    def __init__(self, preprocess: Any, image_size: tuple[int, int]) -> None:
        self.preprocess = preprocess
        self.shape = (3, *image_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [Input(str(i), str(p), int(r), str(c), str(known))
                  for i, p, r, c, known in zip(batch["id"], batch["path"], batch["row"],
                                               batch["column"], batch["problem"],
                                               strict=True)]  # fmt: skip
        reader = ImageInputs(inputs, self.preprocess)
        items = [reader[k] for k in range(len(inputs))]
        zero = np.zeros(self.shape, np.float32)
        return {
            "index": batch["index"],
            "pixels": np.stack([zero if it.pixels is None else it.pixels.numpy() for it in items]),
            "width": np.array([it.size[0] for it in items]),
            "height": np.array([it.size[1] for it in items]),
            "reason": np.array([it.failure.reason if it.failure else "" for it in items]),
            "message": np.array([it.failure.message if it.failure else "" for it in items]),
        }


class Encode:
    """An actor holding the model, loaded once through vitport.load on its own worker."""

    def __init__(self, spec: str, device: str, dtype: str, image_size: int, fixes: list[str],
                 outputs: list[str], weights: str | None = None,
                 trust_remote_code: bool = False, runtime: str = "torch") -> None:  # fmt: skip
        from vitport.runtimes import load_on

        self.encoder, _ = load_on(spec, device, dtype, runtime, fixes, image_size=image_size,
                                  weights=weights, trust_remote_code=trust_remote_code)  # fmt: skip
        self.outputs = outputs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ok = batch["reason"] == ""
        result = {k: batch[k] for k in ("index", "width", "height", "reason", "message")}
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
        rows = features_of(self.encoder, pixels, self.outputs) if ok.any() else []
        for name in self.outputs:
            shape = rows[0][name].shape if rows else (0,)
            column = np.zeros((len(ok), *shape), np.float32)
            if rows:
                column[ok] = np.stack([r[name] for r in rows])
            result[name] = column
        return result


def _actors(encoder: Encoder) -> int:
    import ray

    resource = encoder.device.ray_resource
    if resource is None:
        return 1
    return max(1, int(ray.cluster_resources().get(resource, 1)))


def _quiet_ray() -> None:
    """Ray's own logs to errors only: the progress bar and the summary say what happened."""
    import logging
    import os

    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    for name in ("ray", "ray.data", "ray._private", "ray.data._internal.execution"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _pipeline(ray, rows: list[dict], encoder: Encoder, dims: dict[str, list[int]],
              batch_size: int, actors: int, load_options: dict[str, Any]):  # fmt: skip
    """Reading tasks that decode and preprocess, feeding actors that hold the model."""
    return (
        ray.data.from_items(rows)
        .map_batches(Decode(encoder.preprocess, encoder.image_size), batch_size=batch_size)
        .map_batches(
            Encode, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={
                "spec": encoder.spec, "device": encoder.device.type,
                "dtype": encoder.meta()["dtype"], "image_size": encoder.image_size[0],
                "fixes": list(encoder.fixes), "outputs": list(dims), "runtime": encoder.runtime,
                **load_options,
            },
            max_restarts=0,  # a lost actor fails the run; running it again resumes
            **encoder.device.ray_actor_options(),
        )
    )  # fmt: skip


def run_ray(
    encoder: Encoder, inputs: Sequence[Input], store: Store, todo: Sequence[int],
    dims: dict[str, list[int]], batch_size: int, address: str | None,
    on_batch: Callable[[int, int], None], load_options: dict[str, Any] | None = None,
) -> Timing:  # fmt: skip
    """`load_options`: the weights and trust_remote_code each actor loads the model with."""
    _quiet_ray()
    try:
        import ray
    except ImportError as exc:
        raise VitportError("--engine ray needs Ray Data: pip install 'vitport[ray]'") from exc
    order = [i for k in todo for i in store.shard_range(k)]
    if not order:
        return Timing(workers=0)
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)  # fmt: skip
        except Exception as exc:  # ConnectionError, RuntimeError, ...: all mean "no cluster"
            raise VitportError(f"cannot start or join Ray at {address or 'local'}: {exc}") from exc
    try:
        _quiet_ray()  # Ray sets its loggers up again in init
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # shards complete in order
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        rows = [{"index": i, "id": inputs[i].id, "path": inputs[i].path, "row": inputs[i].row,
                 "column": inputs[i].column, "problem": inputs[i].problem}
                for i in order]  # fmt: skip
        actors = _actors(encoder)
        with warnings.catch_warnings():  # max_restarts has no named parameter in Ray Data yet
            warnings.simplefilter("ignore")
            dataset = _pipeline(ray, rows, encoder, dims, batch_size, actors, load_options or {})
        collector = ShardCollector(store, inputs, dims)
        done = 0
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for k, index in enumerate(batch["index"].tolist()):
                item = inputs[index]
                if batch["reason"][k]:
                    collector.fail(index, Failure(index, item.id, item.path,
                                                  str(batch["reason"][k]),
                                                  str(batch["message"][k])))  # fmt: skip
                else:
                    size = (int(batch["width"][k]), int(batch["height"][k]))
                    collector.add(index, size, {n: batch[n][k] for n in dims})
                done += 1
            on_batch(done, len(order))
        return Timing(workers=actors, notes=[f"Ray Data: {actors} model actor(s)"])
    finally:
        if started:
            ray.shutdown()
