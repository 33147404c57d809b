"""A packaged port's `inference.py`: the port run without vitport.

`inference_script(encoder, manifest)` renders one plain script for the port. It needs only
torch, transformers (timm for a timm port) and, with ``--device npu``, torch_npu. It loads the
checkpoint from the directory it sits in, applies the port's fixes from their templates (each
fix's `Fix.template`, written out), casts to the port's dtype, preprocesses images with the
constants vitport ran with, and saves ``cls``, ``patches`` and ``pooled`` (as vitport's Features
mean them: registers are left out of the patches, a family without a class token has no
``cls``, pooled as the family pools) to a safetensors file.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from vitport.encoder import Encoder
from vitport.errors import VitportError
from vitport.port.manifest import Manifest

SCRIPT = "inference.py"

# transformers' resample settings (PIL's codes or names) as torch interpolation modes
HF_RESAMPLE = {"2": "bilinear", "3": "bicubic", "BILINEAR": "bilinear", "BICUBIC": "bicubic"}
# timm's interpolation names as PIL's
PIL_RESAMPLE = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "nearest": "NEAREST"}


def inference_script(encoder: Encoder, manifest: Manifest) -> str:
    """The standalone ``inference.py`` of a port of `encoder` described by `manifest`.

    Raises :class:`VitportError` for a model or preprocessing the script cannot reproduce.
    """
    from vitport.fixes import FIXES

    timm_port = encoder.family == "timm"
    module = _run_module(encoder, timm_port)
    blocks, final_norm = _block_paths(encoder, module)
    fixes = [FIXES.get(name) for name in manifest.fixes]
    fix_code = "\n".join(fix.template for fix in fixes) or "pass  # this port has no fixes\n"
    fix_code = re.sub(r"\n{3,}", "\n\n", fix_code)  # one blank line inside the function
    layout = encoder.layout
    parts = {
        "title": _title(encoder, manifest),
        "imports_words": "timm" if timm_port else "transformers",
        "source": json.dumps(manifest.source),
        "device": manifest.device_type,
        "dtype": manifest.dtype,
        "fixes": _tuple_literal(manifest.fixes),
        "num_cls": layout.num_cls,
        "num_registers": layout.num_registers,
        "layout": _layout_words(encoder),
        "blocks": "backbone." + blocks,
        "final_norm": f"backbone.{final_norm}" if final_norm else "",
        "preprocessing": _timm_preprocessing(encoder) if timm_port else _hf_preprocessing(encoder),
        "load": _TIMM_LOAD if timm_port else _hf_load(encoder),
        "forward": _TIMM_FORWARD if timm_port else _hf_forward(encoder),
        "apply_fixes": textwrap.indent(
            fix_code.rstrip("\n"), "    ", lambda line: bool(line.strip())
        ),
    }
    parts["json"] = "import json\n" if "json." in parts["load"] else ""
    parts["imports"] = _imports(timm_port, "F." in parts["preprocessing"] + fix_code)
    return _SCRIPT.format(**parts)


def _tuple_literal(names: Sequence[str]) -> str:
    """A tuple of strings as Python source, double-quoted."""
    items = [json.dumps(n) for n in names]
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def _imports(timm_port: bool, functional: bool) -> str:
    """The script's plain imports, in isort's order."""
    modules = ["numpy as np", "torch", "timm" if timm_port else "transformers"]
    if functional:
        modules.append("torch.nn.functional as F")
    return "\n".join(f"import {m}" for m in sorted(modules))


# --------------------------------------------------------------------------- the model


def _hf_family(encoder: Encoder) -> Any:
    from vitport.families.base import family_of_model_type

    family = family_of_model_type(encoder.family.removeprefix("transformers/"))
    if family is None:
        raise VitportError(
            f"{encoder.spec}: a standalone inference.py is written for the families vitport "
            f"knows, not for {encoder.family}; package it without trust_remote_code"
        )
    return family


def _run_module(encoder: Encoder, timm_port: bool) -> nn.Module:
    """The module the script calls: a classifier's base model (its head is not run), as the
    script's loader picks it."""
    module = encoder.module
    if not timm_port and hasattr(module, "classifier"):
        return module.base_model
    return module


def _block_paths(encoder: Encoder, module: nn.Module) -> tuple[str, str]:
    """The dotted names, inside `module`, of the container of the blocks and of the final norm
    ("" where there is none)."""
    names = {id(m): n for n, m in module.named_modules()}
    first = names.get(id(encoder.blocks[0]))
    if first is None:
        raise VitportError(f"{encoder.spec}: its blocks are not inside the module it runs")
    container = first.rpartition(".")[0]
    if [id(b) for b in module.get_submodule(container)] != [id(b) for b in encoder.blocks]:
        raise VitportError(f"{encoder.spec}: its blocks are not one list of modules ({container})")
    norm = encoder.final_norm
    return container, (names.get(id(norm), "") if norm is not None else "")


def _hf_load(encoder: Encoder) -> str:
    """How the script loads the checkpoint: the class vitport's loader picks for it."""
    family = _hf_family(encoder)
    config = encoder.module.config.to_dict()
    named = family.model_class(config)
    if named is not None:
        return _HF_LOAD_NAMED.format(model_class=named)
    return _HF_LOAD_AUTO


def _pooled_lines(pool: Callable[[Any, torch.Tensor], torch.Tensor | None]) -> list[str]:
    """The family's pooled output as plain code, read off its `pool` function: which of the
    model's outputs it takes first, and what it falls back to (the class token or the token
    mean) where the model has neither."""
    tokens = torch.arange(12.0).reshape(1, 3, 4)
    marks = {name: torch.full((1, 4), -float(i + 1)) for i, name in enumerate(_POOLED_OUTPUTS)}
    present = dict(marks)
    lines: list[str] = []
    while present:
        got = pool(SimpleNamespace(**{n: present.get(n) for n in marks}), tokens)
        taken = next((n for n, t in present.items() if got is t), None)
        if taken is None:
            break
        lines.append(f'getattr(out, "{taken}", None)')
        del present[taken]
    got = pool(SimpleNamespace(**dict.fromkeys(marks)), tokens)
    if got is not None and torch.equal(got, tokens[:, 0]):
        lines.append("tokens[:, 0]  # the class token")
    elif got is not None and torch.equal(got, tokens.mean(dim=1)):
        lines.append("tokens.mean(dim=1)  # the mean of the tokens")
    if not lines:
        raise VitportError("the family's pooled output cannot be written as a standalone script")
    code = [f"pooled = {lines[0]}"]
    for line in lines[1:]:
        code += ["if pooled is None:", f"    pooled = {line}"]
    return code


_POOLED_OUTPUTS = ("image_embeds", "pooler_output")


def _hf_forward(encoder: Encoder) -> str:
    family = _hf_family(encoder)
    kwargs = "".join(f", {k}={v!r}" for k, v in family.forward_kwargs.items())
    pooled = textwrap.indent("\n".join(_pooled_lines(family.pool)), " " * 8)
    return _HF_FORWARD.format(kwargs=kwargs, pooled=pooled)


# --------------------------------------------------------------------------- preprocessing


def _hf_preprocessing(encoder: Encoder) -> str:
    """The checkpoint's image processor (transformers' torchvision backend) as plain torch."""
    settings = encoder.preprocess.settings
    resize = dict(settings.get("resize") or {})
    crop = dict(settings.get("crop") or {})
    resample = str(settings.get("resample", ""))
    mode = HF_RESAMPLE.get(resample.rpartition(".")[2].upper())
    if mode is None:
        raise _unsupported(encoder, f"resample {resample}")
    lines = [
        f"MEAN = {tuple(settings['mean'])!r}",
        f"STD = {tuple(settings['std'])!r}",
        f'INTERPOLATION = "{mode}"',
    ]
    if "shortest_edge" in resize:
        lines.insert(
            0, f"RESIZE = {int(resize['shortest_edge'])}  # the short side, before the crop"
        )
        resize_code = _HF_RESIZE_SHORT
        words = f"resize the short side to {resize['shortest_edge']} ({mode})"
    elif "height" in resize and "width" in resize:
        lines.insert(
            0, f"RESIZE = ({int(resize['height'])}, {int(resize['width'])})  # (height, width)"
        )
        resize_code = _HF_RESIZE_SQUARE
        words = f"resize to {resize['height']}x{resize['width']} ({mode})"
    else:
        raise _unsupported(encoder, f"resize {resize}")
    if crop:
        lines.insert(1, f"CROP = ({int(crop['height'])}, {int(crop['width'])})  # (height, width)")
        crop_code = _HF_CROP
        words += f", centre-crop {crop['height']}x{crop['width']}"
    elif "shortest_edge" in resize:
        raise _unsupported(encoder, "a short-side resize without a crop")
    else:
        crop_code = ""
    processor = settings.get("processor", "image processor")
    header = (
        f"# Preprocessing, as vitport ran it (transformers' {processor}, torchvision backend):\n"
        f"# {words}, normalise.\n"
    )
    body = _HF_PREPROCESS.format(resize=resize_code, crop=crop_code)
    return header + "\n".join(lines) + "\n\n\n" + body


def _timm_preprocessing(encoder: Encoder) -> str:
    """timm's eval transform (torchvision on PIL images) with the port's data config."""
    settings = encoder.preprocess.settings
    height, width = (int(s) for s in settings["input_size"][-2:])
    mode = str(settings.get("crop_mode") or "center")
    interpolation = str(settings.get("interpolation") or "bilinear")
    if height != width or mode not in ("center", "squash"):
        raise _unsupported(encoder, f"a {height}x{width} input with crop mode {mode}")
    if interpolation not in PIL_RESAMPLE:
        raise _unsupported(encoder, f"interpolation {interpolation}")
    crop_pct = float(settings.get("crop_pct") or 0.875)
    scale = math.floor(height / crop_pct)
    if mode == "squash":
        words = f"resize to {scale}x{scale}"
        resize = _TIMM_RESIZE_SQUARE
    else:
        words = f"resize the short side to {scale}"
        resize = _TIMM_RESIZE_SHORT
    lines = [
        f"RESIZE = {scale}  # floor({height} / crop_pct {crop_pct})",
        f"CROP = {height}",
        f"MEAN = {tuple(settings['mean'])!r}",
        f"STD = {tuple(settings['std'])!r}",
        f"RESAMPLE = Image.Resampling.{PIL_RESAMPLE[interpolation]}",
    ]
    header = (
        "# Preprocessing, as vitport ran it (timm's eval transform, torchvision on PIL images):\n"
        f"# {words} ({interpolation}), centre-crop {height}x{height}, scale to [0, 1], "
        "normalise.\n"
    )
    return header + "\n".join(lines) + "\n\n\n" + _TIMM_PREPROCESS.format(resize=resize)


def _unsupported(encoder: Encoder, what: str) -> VitportError:
    return VitportError(
        f"{encoder.spec}: the standalone inference.py cannot reproduce its preprocessing "
        f"({what}); package it with --image-size at a square centre crop"
    )


# --------------------------------------------------------------------------- words


def _layout_words(encoder: Encoder) -> str:
    layout = encoder.layout
    cls = "1 class token" if layout.num_cls else "no class token"
    registers = f", {layout.num_registers} register tokens" if layout.num_registers else ""
    return f"{cls}{registers}, then the patch tokens"


def _title(encoder: Encoder, manifest: Manifest) -> str:
    fixes = ", ".join(manifest.fixes) or "none"
    version = f" {manifest.vitport_version}" if manifest.vitport_version else ""
    return (
        f"Standalone inference for the port of {manifest.source} to {manifest.device_type} "
        f"in {manifest.dtype}\n(written by vitport{version}; fixes: {fixes})."
    )


# --------------------------------------------------------------------------- the script

_HF_LOAD_AUTO = '''\
def load_model() -> nn.Module:
    """The checkpoint in this directory, as vitport loads it: on the CPU, in float32."""
    config = json.loads((HERE / "config.json").read_text())
    architectures = config.get("architectures") or []
    classifier = any(a.endswith("ForImageClassification") for a in architectures)
    auto = transformers.AutoModelForImageClassification if classifier else transformers.AutoModel
    checkpoint = auto.from_pretrained(HERE, dtype=torch.float32).eval()
    # a classifier's head is not run: the features come from its base model
    return checkpoint.base_model if hasattr(checkpoint, "classifier") else checkpoint'''

_HF_LOAD_NAMED = '''\
def load_model() -> nn.Module:
    """The checkpoint in this directory, as vitport loads it: on the CPU, in float32."""
    model = transformers.{model_class}.from_pretrained(HERE, dtype=torch.float32)
    return model.eval()'''

_TIMM_LOAD = '''\
def load_model() -> nn.Module:
    """The timm checkpoint in this directory (config.json and its weights), in float32."""
    return timm.create_model(f"local-dir:{HERE}", pretrained=True).eval()'''

_HF_FORWARD = '''\
class Encoder(nn.Module):
    """The forward vitport runs: the output tokens and the pooled output."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone(pixel_values=pixels{kwargs})
        tokens = out.last_hidden_state
{pooled}
        return tokens, pooled'''

_TIMM_FORWARD = '''\
class Encoder(nn.Module):
    """The forward vitport runs: the output tokens and the pooled output (before the head)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.backbone.forward_features(pixels)
        pooled = self.backbone.forward_head(tokens, pre_logits=True)
        return tokens, pooled'''

_HF_RESIZE_SHORT = """\
    # resize the short side to RESIZE, the long side in proportion (rounded down)
    if width <= height:
        size = (int(RESIZE * height / width), RESIZE)
    else:
        size = (RESIZE, int(RESIZE * width / height))"""

_HF_RESIZE_SQUARE = """\
    size = RESIZE"""

_HF_CROP = """
    # centre-crop
    height, width = pixels.shape[-2:]
    top, left = int((height - CROP[0]) / 2.0), int((width - CROP[1]) / 2.0)
    pixels = pixels[:, top : top + CROP[0], left : left + CROP[1]]"""

_HF_PREPROCESS = '''\
def preprocess(image: Image.Image) -> torch.Tensor:
    """An RGB image as normalised pixels [3, H, W], computed as the checkpoint's processor does."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    height, width = pixels.shape[-2:]
{resize}
    if tuple(size) != (height, width):  # resized in uint8, antialiased, as torchvision does
        pixels = F.interpolate(
            pixels[None], size=size, mode=INTERPOLATION, align_corners=False, antialias=True
        )[0]{crop}
    mean = torch.tensor(MEAN) * 255.0
    std = torch.tensor(STD) * 255.0
    return (pixels.float() - mean[:, None, None]) / std[:, None, None]'''

_TIMM_RESIZE_SHORT = """\
    # resize the short side to RESIZE, the long side in proportion (rounded down)
    width, height = image.size
    if width <= height:
        size = (RESIZE, int(RESIZE * height / width))
    else:
        size = (int(RESIZE * width / height), RESIZE)"""

_TIMM_RESIZE_SQUARE = """\
    size = (RESIZE, RESIZE)"""

_TIMM_PREPROCESS = '''\
def preprocess(image: Image.Image) -> torch.Tensor:
    """An RGB image as normalised pixels [3, CROP, CROP], computed as timm's transform does."""
{resize}
    if size != image.size:
        image = image.resize(size, RESAMPLE)
    # centre-crop
    width, height = image.size
    top, left = int(round((height - CROP) / 2.0)), int(round((width - CROP) / 2.0))
    image = image.crop((left, top, left + CROP, top + CROP))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255
    return (pixels - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]'''

_SCRIPT = '''\
#!/usr/bin/env python3
"""{title}

Needs only torch, {imports_words} and, with --device npu, torch_npu; not vitport.

    python inference.py IMAGE... --device DEVICE --out features.safetensors

saves `cls` [B, D] (where the model has a class token), `patches` [B, N, D] (register tokens
left out) and `pooled` [B, D'] in float32, and prints their shapes.
"""

import argparse
{json}from pathlib import Path

{imports}
from PIL import Image, ImageOps
from safetensors.torch import save_file
from torch import nn

HERE = Path(__file__).resolve().parent
SOURCE = {source}  # what the port was made from
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # the checkpoint's weights, beside this file
DEVICE = "{device}"  # the port's device type
DTYPE = "{dtype}"  # the port's dtype
# the port's fixes, in the order apply_fixes below writes them out
FIXES = {fixes}
DTYPES = {{"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}}

# Token layout: {layout}
NUM_CLS = {num_cls}
NUM_REGISTERS = {num_registers}
BLOCKS = "{blocks}"  # the transformer blocks, inside Encoder
FINAL_NORM = "{final_norm}"  # the norm on the output tokens, inside Encoder ("" for none)

{preprocessing}


def load_image(path: Path) -> Image.Image:
    """A file as an upright RGB image, transparency composited onto white, as vitport reads it."""
    image = ImageOps.exif_transpose(Image.open(path))
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        white.alpha_composite(image.convert("RGBA"))
        image = white
    return image.convert("RGB")


{load}


{forward}


def apply_fixes(model: nn.Module, blocks: list[nn.Module], final_norm: str) -> None:
    """The port's fixes, in order, as vitport applies them."""

{apply_fixes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument("--device", default=DEVICE, help=f"cpu, cuda, npu, ... (default {{DEVICE}})")
    parser.add_argument("--dtype", default=DTYPE, choices=sorted(DTYPES))
    parser.add_argument("--out", type=Path, default=Path("features.safetensors"))
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    if args.device.split(":")[0] == "npu":
        import torch_npu  # noqa: F401  (makes the NPU a torch device)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if not any((HERE / name).is_file() for name in WEIGHTS):
        raise SystemExit(
            f"no weights beside {{__file__}}: this port records only its source, {{SOURCE}}; "
            "put that checkpoint's files (config.json and its weights) here"
        )

    model = Encoder(load_model()).to(device=device, dtype=dtype)
    apply_fixes(model, list(model.get_submodule(BLOCKS)), FINAL_NORM)

    images = [load_image(path) for path in args.images]
    found = {{"cls": [], "patches": [], "pooled": []}}
    with torch.inference_mode():
        for start in range(0, len(images), args.batch_size):
            batch = images[start : start + args.batch_size]
            pixels = torch.stack([preprocess(image) for image in batch])
            tokens, pooled = model(pixels.to(device=device, dtype=dtype))
            if NUM_CLS:
                found["cls"].append(tokens[:, 0])
            found["patches"].append(tokens[:, NUM_CLS + NUM_REGISTERS :])
            if pooled is not None:
                found["pooled"].append(pooled)
    outputs = {{
        name: torch.cat(parts).to("cpu", torch.float32).contiguous()
        for name, parts in found.items()
        if parts
    }}
    save_file(outputs, str(args.out))
    for name, tensor in outputs.items():
        print(f"{{name}}: {{list(tensor.shape)}}")
    print(f"saved {{args.out}}")


if __name__ == "__main__":
    main()
'''
