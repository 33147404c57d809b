"""`embed --engine ray`: the same pipeline on Ray Data. Reading tasks decode and preprocess,
actors that hold the model encode (GPUs through `num_gpus`, Ascend NPUs through Ray's `NPU`
resource), and the driver writes the same shards through the same store, so the output
contract, the errors table and resuming are those of the local engine."""

from __future__ import annotations

import ctypes
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vitport.cluster import ray_cluster
from vitport.embed.shards import ShardCollector, Timing, features_of
from vitport.embed.store import Store
from vitport.encoder import Encoder
from vitport.errors import ClusterError, one_line
from vitport.inputs.stream import Failure, ImageInputs, Input


class Decode:
    """A reading task: inputs to pixels, a failed input to a zero image and its reason."""

    def __init__(self, preprocess: Any, image_size: tuple[int, int]) -> None:
        self.preprocess = preprocess
        self.shape = (3, *image_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [
            Input(str(i), str(p), int(r), str(c), str(known), str(kind))
            for i, p, r, c, known, kind in zip(
                batch["id"],
                batch["path"],
                batch["row"],
                batch["column"],
                batch["problem"],
                batch["problem_category"],
                strict=True,
            )
        ]
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

    def __init__(
        self,
        spec: str,
        device: str,
        dtype: str,
        image_size: int,
        fixes: list[str],
        outputs: list[str],
        weights: str | None = None,
        trust_remote_code: bool = False,
        runtime: str = "torch",
    ) -> None:
        from vitport.runtimes import Setup, load

        self.encoder = load(
            spec,
            device,
            Setup(runtime, dtype, fixes=tuple(fixes)),
            image_size=image_size,
            weights=weights,
            trust_remote_code=trust_remote_code,
        ).encoder
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


MAX_RESTARTS = 4  # a model actor lost with its node starts again on another, this often
MAX_TASK_RETRIES = -1  # the batch it held is sent again until it runs (a node's death takes
# Ray a while to notice; --stall-timeout ends a run that makes no progress)
DEFAULT_STALL_TIMEOUT = 300.0
NODE_DEATH_WAIT = 30  # seconds to learn which node was lost, when Ray gives up first


def cpu_shares(nodes: Sequence[dict], resource: str | None) -> float:
    """The CPUs one model actor and one reading task each ask for: 1, or less where a node
    holding its model actors would otherwise have no CPU left for a reading task (which is how a
    one-CPU node hangs: the actor holds the CPU and every read waits for it forever)."""
    share = 1.0
    for node in nodes:
        cpus = node["Resources"].get("CPU", 0.0)
        if not node["Alive"] or cpus <= 0:
            continue
        actors = 1 if resource is None else int(node["Resources"].get(resource, 0))
        share = min(share, cpus / (actors + 1))
    return share


def _pipeline(
    ray,
    rows: list[dict],
    encoder: Encoder,
    dims: dict[str, list[int]],
    batch_size: int,
    actors: int,
    cpus: float,
    load_options: dict[str, Any],
):
    """Reading tasks that decode and preprocess, feeding actors that hold the model; Ray starts
    a lost actor again elsewhere and retries what it held."""
    return (
        ray.data.from_items(rows)
        .map_batches(
            Decode(encoder.preprocess, encoder.image_size), batch_size=batch_size, num_cpus=cpus
        )
        .map_batches(
            Encode,
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={
                "spec": encoder.spec,
                "device": encoder.device.type,
                "dtype": encoder.meta()["dtype"],
                "image_size": encoder.image_size[0],
                "fixes": list(encoder.fixes),
                "outputs": list(dims),
                "runtime": encoder.runtime,
                **load_options,
            },
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES,
            **{**encoder.device.ray_actor_options(), "num_cpus": cpus},
        )
    )


def _node(node: dict) -> str:
    return f"node {node['NodeID'][:8]} ({node['NodeManagerAddress']})"


def lost_nodes(ray, alive_at_start: set[str]) -> list[str]:
    return [_node(n) for n in ray.nodes() if n["NodeID"] in alive_at_start and not n["Alive"]]


def waiting(ray) -> str:
    """What the cluster is waiting for, in words: "19 tasks or actors waiting for 1 CPU each;
    the cluster has 0 of 1 CPU free"."""
    demands: list[str] = []
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        for demand in status.resource_demands.ray_task_actor_demand:
            for request in demand.bundles_by_count:
                bundle = {k: v for k, v in request.bundle.items() if k != "memory"}
                each = ", ".join(f"{v:g} {k}" for k, v in sorted(bundle.items()))
                demands.append(f"{request.count} tasks or actors waiting for {each} each")
    except Exception:  # an older or newer Ray without this status: say what is free only
        pass
    total, free = ray.cluster_resources(), ray.available_resources()
    have = ", ".join(
        f"{free.get(k, 0.0):g} of {total[k]:g} {k}" for k in ("CPU", "GPU", "NPU") if k in total
    )
    return "; ".join(
        [*demands, f"the cluster has {have} free" if have else "the cluster has no CPU"]
    )


class _Stalled(BaseException):  # past `except Exception` in Ray Data, like a Ctrl-C
    """Raised in the thread reading the dataset, so that Ray Data shuts its execution down."""


class Watchdog:
    """Ends a run that makes no progress: after `timeout` seconds without `progress()`, it
    raises _Stalled in the thread that entered it (Ray Data's wait for output is a Python loop,
    so the exception arrives there and Ray Data cleans up as after a Ctrl-C)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.last = time.monotonic()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.fired = False

    def progress(self) -> None:
        self.last = time.monotonic()

    def _watch(self, thread: int) -> None:
        while not self.done.wait(1.0):
            if time.monotonic() - self.last < self.timeout:
                continue
            with self.lock:
                if not self.done.is_set():
                    self.fired = True
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(
                        ctypes.c_ulong(thread), ctypes.py_object(_Stalled)
                    )
            return

    def __enter__(self) -> Watchdog:
        watcher = threading.Thread(
            target=self._watch,
            args=(threading.get_ident(),),
            name="vitport-ray-watchdog",
            daemon=True,
        )
        watcher.start()
        return self

    def __exit__(self, *_: Any) -> None:
        with self.lock:
            self.done.set()


GIVE_UP = (
    "ActorDiedError",
    "ActorUnavailableError",
    "NodeDiedError",
    "ObjectLostError",
    "OwnerDiedError",
    "WorkerCrashedError",
    "ObjectReconstructionFailedError",
)


def _gave_up(exc: BaseException, lost: list[str]) -> bool:
    names = {type(exc).__name__, *(type(c).__name__ for c in (exc.__cause__,) if c)}
    return bool(lost) or bool(names & set(GIVE_UP))


def run_ray(
    encoder: Encoder,
    inputs: Sequence[Input],
    store: Store,
    todo: Sequence[int],
    dims: dict[str, list[int]],
    batch_size: int,
    address: str | None,
    on_batch: Callable[[int, int], None],
    load_options: dict[str, Any] | None = None,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT,
) -> Timing:
    """`load_options`: the weights and trust_remote_code each actor loads the model with."""
    _quiet_ray()
    found = store.found_pieces()
    order = [i for k in todo for i in store.remaining(k, found)]
    if not order:
        return Timing(workers=0)
    with ray_cluster(
        address, needs="Ray Data", module="ray.data", extra="ray", configure_logging=False
    ) as ray:
        collector = ShardCollector(store, inputs, dims, found)

        def kept() -> str:
            done = sum(store.done(k) for k in range(store.num_shards))
            return (
                f"the {done} shard(s) written to {store.dir} are kept; "
                "run the same command again to resume"
            )

        _quiet_ray()  # Ray sets its loggers up again in init
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # shards complete in order
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        rows = [
            {
                "index": i,
                "id": inputs[i].id,
                "path": inputs[i].path,
                "row": inputs[i].row,
                "column": inputs[i].column,
                "problem": inputs[i].problem,
                "problem_category": inputs[i].problem_category,
            }
            for i in order
        ]
        nodes = ray.nodes()
        alive = {n["NodeID"] for n in nodes if n["Alive"]}
        actors = _actors(encoder)
        cpus = cpu_shares(nodes, encoder.device.ray_resource)
        with warnings.catch_warnings():  # Ray Data 2.60 has no named max_restarts yet
            warnings.simplefilter("ignore")
            dataset = _pipeline(
                ray, rows, encoder, dims, batch_size, actors, cpus, load_options or {}
            )

        def stalled() -> str:
            lost = lost_nodes(ray, alive)
            gone = f" after losing {', '.join(lost)}" if lost else ""
            return f"no progress for {stall_timeout:g} s{gone}: {waiting(ray)}; {kept()}"

        done = 0
        try:
            with Watchdog(stall_timeout) as watchdog:
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    watchdog.progress()
                    for k, index in enumerate(batch["index"].tolist()):
                        item = inputs[index]
                        if batch["reason"][k]:
                            collector.fail(
                                index,
                                Failure(
                                    index,
                                    item.id,
                                    item.path,
                                    str(batch["reason"][k]),
                                    str(batch["message"][k]),
                                ),
                            )
                        else:
                            size = (int(batch["width"][k]), int(batch["height"][k]))
                            collector.add(index, size, {n: batch[n][k] for n in dims})
                        done += 1
                    on_batch(done, len(order))
        except KeyboardInterrupt:
            collector.keep()
            raise
        except _Stalled:
            raise ClusterError(stalled()) from None
        except Exception as exc:
            lost = lost_nodes(ray, alive)
            if not _gave_up(exc, lost):
                raise
            for _ in range(NODE_DEATH_WAIT):  # Ray may give up before it declares the node dead
                if lost:
                    break
                time.sleep(1)
                lost = lost_nodes(ray, alive)
            what = f"lost {', '.join(lost)}" if lost else "lost a worker"
            raise ClusterError(
                f"Ray {what} and gave up ({one_line(exc, typed=True)}); {kept()}"
            ) from exc
        notes = [f"Ray Data: {actors} model actor(s), {cpus:g} CPU each and per reading task"]
        lost = lost_nodes(ray, alive)
        if lost:
            notes.append(
                f"Ray lost {', '.join(lost)} during the run; its model actors were "
                "started again and its batches retried"
            )
        return Timing(workers=actors, notes=notes)
