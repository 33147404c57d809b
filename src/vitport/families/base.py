"""The family record and its registry: everything vitport knows about one family of models.

A family is one module under ``vitport/families/`` that builds one frozen `Family` as its
``FAMILY``. `MODULES` below is the one list of those modules: `registry()` imports them in that
order and registers each ``FAMILY``. Nothing else in vitport names a family, its transformers
model types or its classes.

What a family module provides (fields of `Family`; all but the first two have defaults):

- ``name``, ``title``: its registry name (``vit``) and its name in words (``ViT``).
- What it claims: ``model_types`` (transformers ``config.model_type`` values) and ``classes``
  (the transformers class names its module spells, so the structure test can find a stray one).
  A timm family claims timm names through ``timm_names`` (fnmatch patterns).
- Architecture and token layout, read from a transformers config: ``layout(config)`` gives the
  `TokenLayout` (CLS, registers, patch), ``architecture(config, backbone)`` the `Architecture`
  (widths read from the config or, where the config only implies them, from the module).
  ``resizable`` says whether its position embeddings follow the input size, ``forward_kwargs``
  what its forward needs for that. ``model_class(config_json)`` names the transformers class to
  load (default: the Auto class's choice; it may refuse a kind of checkpoint in one line),
  ``vision_tower`` where a multimodal model keeps its encoder, ``final_norm(backbone)`` the norm
  that gives the output tokens (default: the top-level module named norm; None where the last
  block's tokens are the output).
- Preprocessing: checkpoints bring their own image processor, which the loader reads (and
  records in neutral terms as `Preprocess.recipe`); ``preprocessing`` is the one the family's
  original releases prescribe, for checkpoints that come without one (see `ForeignLayout`).
- Block parts and their roles: ``block_roles(block)`` maps a block's children to ``attention``,
  ``mlp`` and ``norm``; the Encoder's ``block_parts`` (localisation, msprobe binding) asks it.
  The default finds them by name and kind; a family whose blocks name them otherwise gives its
  own.
- Pooler: ``pool(output, tokens)``, the family's pooled output from its forward's output.
- FLOP inputs: the `Architecture` above (widths, depth, patch, gated MLP) plus
  ``head_flops(backbone, tokens)``, the per-image FLOPs of a pooling head or projection that the
  block formula does not count, for a sequence of `tokens` tokens.
- Conversion: ``conversions``, each with its mapping tables (written once, inverses derived),
  the transformers config and timm recipe that rebuild it; ``foreign``, the layouts of its
  original releases that vitport reads (recognised by a sentinel key).
- ``tiny``: tiny random models of the family (hidden 32, 2 layers), written to a directory the
  way a user's checkpoint is; the tests build every registered family's from here.

A transformers family is loaded by `vitport.families.hf` for the model types it claims; a timm
family (``loader="timm"``, as `vitport.families.timm_vit`) by its own ``load`` for the timm names
it claims. Adding a family is one new module and its test file, plus its name in `MODULES`; the
README's "Adding a family" walks through it.
"""

from __future__ import annotations

import fnmatch
import importlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitport.encoder import Architecture, Preprocessing, TokenLayout, block_roles
from vitport.errors import SpecError, UnsupportedModelError, WeightsError
from vitport.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitport.convert.engine import Table
    from vitport.families.loaded import LoadedModel

# The one list of family modules, in the order families are tried and listed.
MODULES = ("dinov2", "dinov3", "vit", "aimv2", "clip", "siglip", "timm_vit", "demo")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@dataclass(frozen=True)
class ForeignLayout:
    """A checkpoint layout only a family's original release uses (read only, converted to hf).

    ``sentinel``: a key only that layout has; ``recognise``: whether a config.json beside the
    weights belongs to it (rather than to a transformers checkpoint); ``architecture``: the
    `Architecture` from its tensors, its config and the timm architecture named with --arch
    (for the head count, when the config does not state it); ``preprocessing``: what the release prescribes for that architecture."""

    name: str
    sentinel: str
    architecture: Callable[
        [Mapping[str, torch.Tensor], Mapping[str, Any], str | None], Architecture
    ]
    preprocessing: Callable[[Architecture], Preprocessing]
    recognise: Callable[[Mapping[str, Any]], bool] = lambda _config: False
    timm_aliases: Mapping[str, str] = field(default_factory=dict)  # its own names for timm archs


@dataclass(frozen=True)
class Conversion:
    """One architecture key of a family (``Architecture.family``) and how it converts.

    ``tables``: every mapping table (forward ones and their inverses); ``hf_config(arch)``: the
    transformers config (``architectures`` set) that gives exactly `arch`; ``timm_name(arch)``:
    the timm architecture that does, with ``timm_args(arch)`` added to the shared arguments;
    ``timm_match(module)``: whether a loaded timm model is this architecture;
    ``hf_prefix``: the base-model prefix of its transformers head models' files."""

    key: str
    model_types: tuple[str, ...]
    tables: tuple[Table, ...]
    hf_config: Callable[[Architecture], Any]
    timm_name: Callable[[Architecture], str]
    timm_match: Callable[[nn.Module], bool]
    timm_args: Callable[[Architecture], dict[str, Any]] = lambda _arch: {}
    timm_packed_mlp: bool = False  # timm's SwiGLUPacked: fc1 holds gate and value (2x wide)
    hf_prefix: str = ""
    dropped_groups: Mapping[str, str] = field(default_factory=dict)  # a drop reason -> output group


@dataclass(frozen=True)
class TinyModel:
    """A tiny random model of a family, written the way a user's checkpoint is, and the token
    layout its config implies."""

    name: str
    build: Callable[[Path], None]
    num_cls: int
    num_registers: int
    grid: tuple[int, int]
    has_logits: bool = False


def cls_pool(output: Any, tokens: torch.Tensor) -> torch.Tensor:
    """The model's own pooler output where it has one, else the (normalised) class token."""
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else tokens[:, 0]


def mean_pool(output: Any, tokens: torch.Tensor) -> torch.Tensor:
    """The model's own pooler output where it has one, else the mean of its tokens."""
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else tokens.mean(dim=1)


def no_head(_module: nn.Module, _tokens: int) -> float:
    return 0.0


def auto_class(_config: Mapping[str, Any]) -> str | None:
    """transformers' Auto class chooses (AutoModelForImageClassification for a classifier)."""
    return None


def refuse_classifiers(config: Mapping[str, Any], title: str, tower: str) -> list[str]:
    """A checkpoint's `architectures`, refusing a classifier in one line: vitport reads the
    vision tower of a vision-language model, saved as `tower`."""
    architectures = list(config.get("architectures") or [])
    heads = [a for a in architectures if a.endswith("ForImageClassification")]
    if heads:
        raise UnsupportedModelError(
            f"{heads[0]} is not supported (vitport reads {title}'s vision tower); "
            f"save its vision tower as {tower} and pass that"
        )
    return architectures


def named_norm(backbone: nn.Module) -> nn.Module | None:
    """The final norm: the first top-level module whose name says norm."""
    return next((m for n, m in backbone.named_children() if "norm" in n), None)


def config_layout(has_cls: bool) -> Callable[[Any], TokenLayout]:
    """The token layout of a transformers config: CLS or not, its register tokens, its patch."""

    def layout(config: Any) -> TokenLayout:
        registers = int(getattr(config, "num_register_tokens", 0) or 0)
        return TokenLayout(int(has_cls), registers, int(config.patch_size))

    return layout


@dataclass(frozen=True)
class Family:
    """Everything vitport knows about one family of models (see the module docstring)."""

    name: str
    title: str
    model_types: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    timm_names: tuple[str, ...] = ()
    loader: str = "transformers"  # "transformers", "timm" or "" (a source of other families)
    # a timm family's loader: (timm name, weights file, image size) -> LoadedModel
    load: Callable[[str, Path | None, int | None], LoadedModel] | None = None
    layout: Callable[[Any], TokenLayout] = config_layout(True)
    architecture: Callable[[Any, nn.Module], Architecture] | None = None
    resizable: bool = True
    forward_kwargs: Mapping[str, Any] = field(default_factory=dict)
    model_class: Callable[[Mapping[str, Any]], str | None] = auto_class
    vision_tower: Callable[[nn.Module], nn.Module] | None = None
    final_norm: Callable[[nn.Module], nn.Module | None] = named_norm
    preprocessing: Preprocessing | None = None
    block_roles: Callable[[nn.Module], dict[str, str]] = block_roles
    pool: Callable[[Any, torch.Tensor], torch.Tensor] = cls_pool
    head_flops: Callable[[nn.Module, int], float] = no_head
    conversions: tuple[Conversion, ...] = ()
    foreign: tuple[ForeignLayout, ...] = ()
    tiny: tuple[TinyModel, ...] = ()

    def claims(self) -> tuple[str, ...]:
        """Every string only this family's module may spell."""
        return (*self.model_types, *self.classes)

    def claims_timm(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.timm_names)


FAMILIES: Registry[Family] = Registry("family", "family")


def registry() -> Registry[Family]:
    """The family registry: each module of `MODULES` imported and its `FAMILY` registered, in
    that order, on first use."""
    if not FAMILIES:
        for name in MODULES:
            module = importlib.import_module(f"vitport.families.{name}")
            FAMILIES.register(module.FAMILY.name, module.FAMILY)
    return FAMILIES


def families() -> list[Family]:
    reg = registry()
    return [reg.get(name) for name in reg.names()]


def family_of_timm_name(name: str) -> Family | None:
    """The timm family that claims a timm model name (or a timm directory), or None."""
    return next((f for f in families() if f.loader == "timm" and f.claims_timm(name)), None)


def family_of_model_type(model_type: str) -> Family | None:
    """The family that claims a transformers model type, or None."""
    return next((f for f in families() if model_type in f.model_types), None)


def conversions() -> list[Conversion]:
    return [c for f in families() for c in f.conversions]


def conversion(key: str) -> Conversion | None:
    """The conversion of an architecture key (``Architecture.family``), or None."""
    return next((c for c in conversions() if c.key == key), None)


def conversion_of_model_type(model_type: str) -> Conversion | None:
    return next((c for c in conversions() if model_type in c.model_types), None)


def convertible_titles() -> str:
    """The families vitport converts between layouts, in words ("A, B and C")."""
    titles = [f.title for f in families() if f.conversions]
    return ", ".join(titles[:-1]) + f" and {titles[-1]}" if len(titles) > 1 else "".join(titles)


def foreign_layouts() -> list[ForeignLayout]:
    return [layout for f in families() for layout in f.foreign]


def supported_types() -> str:
    """The transformers model types vitport loads, in words."""
    return ", ".join(sorted(t for f in families() for t in f.model_types))


def tiny_models() -> dict[str, TinyModel]:
    """Every registered family's tiny models, by name."""
    return {t.name: t for f in families() for t in f.tiny}


# --- helpers family modules share ------------------------------------------------------------

TINY_SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


def bit_processor(crop: int, short: int) -> Any:
    """A DINOv2-style processor: resize the short side, centre-crop, ImageNet statistics."""
    from transformers import BitImageProcessor

    return BitImageProcessor(
        size={"shortest_edge": short},
        crop_size={"height": crop, "width": crop},
        do_center_crop=True,
        image_mean=list(IMAGENET[0]),
        image_std=list(IMAGENET[1]),
        resample=3,
    )


def square_processor(side: int) -> Any:
    """A ViT-style processor: resize to a square."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": side, "width": side})


def tiny_transformers(
    model_class: str, config_class: str, processor: Callable[[], Any], **config: Any
) -> Callable[[Path], None]:
    """A builder that saves a seeded tiny random transformers model and its processor."""

    def build(path: Path) -> None:
        import torch
        import transformers

        torch.manual_seed(0)
        cfg = getattr(transformers, config_class)(**{**TINY_SIZES, **config})
        getattr(transformers, model_class)(cfg).save_pretrained(path)
        processor().save_pretrained(path)

    return build


def mlp_width(mlp: nn.Module) -> int:
    """An MLP's hidden width, read off the module: the input width of its last linear layer (the
    projection back to the model width), gated or not, whatever the version names it."""
    from torch import nn

    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].in_features)


def count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """1 + the highest block index under `prefix`, so a block missing a tensor still counts."""
    found = [re.match(rf"{re.escape(prefix)}(\d+)\.", k) for k in state]
    return 1 + max((int(m.group(1)) for m in found if m), default=-1)


def square_grid(positions: int, what: str) -> int:
    side = math.isqrt(positions)
    if side * side != positions:
        raise WeightsError(f"{what} holds {positions} positions, not a square grid")
    return side


def heads_from_width(hidden: int, head_width: int, key: str) -> int:
    """The head count of a checkpoint without config, from its family's head width."""
    if hidden % head_width:
        raise SpecError(
            f"cannot tell the head count: the checkpoint has no config and its width {hidden} "
            f"is not a multiple of {key}'s head width {head_width}; name the architecture "
            "with arch=...",
            params=("arch=...",),
        )
    return hidden // head_width


def timm_aliases() -> dict[str, str]:
    """Names the families' own releases give timm architectures (DINOv2's torch-hub names)."""
    return {k: v for layout in foreign_layouts() for k, v in layout.timm_aliases.items()}


def timm_heads(name: str) -> int:
    """The head count of a timm architecture (a release's own names accepted)."""
    import timm
    import torch

    aliases = timm_aliases()
    name = aliases.get(name, name)
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except RuntimeError as exc:
        examples = ", ".join(sorted(aliases)[:4])
        raise SpecError(
            f"arch={name}: timm has no such architecture (e.g. vit_large_patch14_dinov2, "
            f"or a torch-hub name: {examples}, ...)",
            params=("arch=",),
        ) from exc
    return int(model.blocks[0].attn.num_heads)


def stated_architecture(gated: Callable[[Any], bool]) -> Callable[[Any, nn.Module], Architecture]:
    """The architecture of a config that states its MLP width (``intermediate_size``)."""

    def architecture(config: Any, backbone: nn.Module) -> Architecture:
        return Architecture(
            hidden_size=int(config.hidden_size),
            depth=int(config.num_hidden_layers),
            num_heads=int(config.num_attention_heads),
            mlp_hidden=int(config.intermediate_size),
            gated_mlp=bool(gated(config)),
            patch_size=int(config.patch_size),
            in_chans=int(getattr(config, "num_channels", 3)),
        )

    return architecture
