"""The mapping tables, one per pair of layouts and family, as data.

transformers names are those of its checkpoint files (what `save_pretrained` writes and every
transformers version reads), without a head model's base prefix (`vit.`). Each table is written
once in one direction; the other direction is its inverse.
"""

from __future__ import annotations

from dataclasses import replace

from vitport.convert.engine import Rule, Table, fill, rename, split

MASK_TOKEN = (
    "mask_token is used only by masked-image training, never at inference; "
    "it does not change the function"
)
POOLER = (
    "transformers' ViT pooler (dense + tanh) has no timm counterpart; "
    "timm's pooled output is the normalised class token"
)

_HF_DINOV2_BLOCK = "encoder.layer.{i}"
_HF_ATTN = _HF_DINOV2_BLOCK + ".attention.attention"


def _dinov2_block_rules(src: str, qkv: str, proj: str, ls: str) -> tuple[Rule, ...]:
    """A DINOv2 block (timm and torch-hub name its parts alike) into transformers'."""
    b, h = src + ".{i}", _HF_DINOV2_BLOCK
    return (
        rename(f"{b}.norm1", f"{h}.norm1"),
        split(f"{b}.attn.{qkv}", f"{_HF_ATTN}.query", f"{_HF_ATTN}.key", f"{_HF_ATTN}.value"),
        rename(f"{b}.attn.{proj}", f"{h}.attention.output.dense"),
        rename(f"{b}.{ls}1.gamma", f"{h}.layer_scale1.lambda1"),
        rename(f"{b}.norm2", f"{h}.norm2"),
        rename(f"{b}.mlp.fc1", f"{h}.mlp.fc1"),
        rename(f"{b}.mlp.fc2", f"{h}.mlp.fc2"),
        rename(f"{b}.{ls}2.gamma", f"{h}.layer_scale2.lambda1"),
    )


_DINOV2_EMBED = (
    rename("patch_embed.proj", "embeddings.patch_embeddings.projection"),
    rename("norm", "layernorm"),
)

TIMM_HF_DINOV2 = Table(
    name="timm-to-hf/dinov2",
    version=1,
    source="timm",
    target="hf",
    family="dinov2",
    rules=(
        rename("cls_token", "embeddings.cls_token"),
        rename("pos_embed", "embeddings.position_embeddings"),
        fill("embeddings.mask_token", MASK_TOKEN),
        *_DINOV2_EMBED,
        *_dinov2_block_rules("blocks", "qkv", "proj", "ls"),
    ),
)

# timm's register models add the class position to the class token (no_embed_class); transformers
# adds it with the patch positions. Going to transformers the class position becomes zero.
TIMM_HF_DINOV2_REG = Table(
    name="timm-to-hf/dinov2-registers",
    version=1,
    source="timm",
    target="hf",
    family="dinov2-registers",
    rules=(
        Rule(
            "unfold_class_pos",
            ("cls_token", "pos_embed"),
            ("embeddings.cls_token", "embeddings.position_embeddings"),
        ),
        rename("reg_token", "embeddings.register_tokens"),
        fill("embeddings.mask_token", MASK_TOKEN),
        *_DINOV2_EMBED,
        *_dinov2_block_rules("blocks", "qkv", "proj", "ls"),
    ),
)

HUB_HF_DINOV2 = Table(
    name="dinov2-hub-to-hf/dinov2",
    version=1,
    source="dinov2-hub",
    target="hf",
    family="dinov2",
    rules=(
        rename("cls_token", "embeddings.cls_token"),
        rename("pos_embed", "embeddings.position_embeddings"),
        rename("register_tokens", "embeddings.register_tokens"),
        rename("mask_token", "embeddings.mask_token"),
        *_DINOV2_EMBED,
        *_dinov2_block_rules("blocks", "qkv", "proj", "ls"),
        # ViT-g: fused SwiGLU, gate and value in one matrix, in the order transformers expects
        rename("blocks.{i}.mlp.w12", "encoder.layer.{i}.mlp.weights_in"),
        rename("blocks.{i}.mlp.w3", "encoder.layer.{i}.mlp.weights_out"),
    ),
)

_VIT_BLOCK = "encoder.layer.{i}"
_VIT_ATTN = _VIT_BLOCK + ".attention.attention"

TIMM_HF_VIT = Table(
    name="timm-to-hf/vit",
    version=1,
    source="timm",
    target="hf",
    family="vit",
    rules=(
        rename("cls_token", "embeddings.cls_token"),
        rename("pos_embed", "embeddings.position_embeddings"),
        rename("patch_embed.proj", "embeddings.patch_embeddings.projection"),
        rename("blocks.{i}.norm1", f"{_VIT_BLOCK}.layernorm_before"),
        split(
            "blocks.{i}.attn.qkv", f"{_VIT_ATTN}.query", f"{_VIT_ATTN}.key", f"{_VIT_ATTN}.value"
        ),
        rename("blocks.{i}.attn.proj", f"{_VIT_BLOCK}.attention.output.dense"),
        rename("blocks.{i}.norm2", f"{_VIT_BLOCK}.layernorm_after"),
        rename("blocks.{i}.mlp.fc1", f"{_VIT_BLOCK}.intermediate.dense"),
        rename("blocks.{i}.mlp.fc2", f"{_VIT_BLOCK}.output.dense"),
        rename("norm", "layernorm"),
        rename("head", "classifier"),
        Rule("fill", (), ("pooler.dense",), POOLER),
    ),
)

_AIM_BLOCK = "encoder.layers.{i}"

APPLE_HF_AIMV2 = Table(
    name="aimv2-apple-to-hf/aimv2",
    version=1,
    source="aimv2-apple",
    target="hf",
    family="aimv2",
    rules=(
        rename("preprocessor.patchifier.proj", "embeddings.patch_embed"),
        rename("preprocessor.patchifier.norm", "embeddings.rms_norm"),
        Rule("reshape", ("preprocessor.pos_embed",), ("embeddings.position_embedding.weight",)),
        rename("trunk.blocks.{i}.norm_1", f"{_AIM_BLOCK}.rms_norm1"),
        split(
            "trunk.blocks.{i}.attn.qkv",
            f"{_AIM_BLOCK}.attention.q_proj",
            f"{_AIM_BLOCK}.attention.k_proj",
            f"{_AIM_BLOCK}.attention.v_proj",
        ),
        rename("trunk.blocks.{i}.attn.proj", f"{_AIM_BLOCK}.attention.out_proj"),
        rename("trunk.blocks.{i}.norm_2", f"{_AIM_BLOCK}.rms_norm2"),
        # SwiGLU: fc2(silu(fc1(x)) * fc3(x)) is down(silu(gate(x)) * up(x))
        rename("trunk.blocks.{i}.mlp.fc1", f"{_AIM_BLOCK}.ffn.gate_proj"),
        rename("trunk.blocks.{i}.mlp.fc3", f"{_AIM_BLOCK}.ffn.up_proj"),
        rename("trunk.blocks.{i}.mlp.fc2", f"{_AIM_BLOCK}.ffn.down_proj"),
        rename("trunk.post_trunk_norm", "rms_norm"),
    ),
)

# The hub layout is the same with or without registers; the registers rule fires when they exist.
HUB_HF_DINOV2_REG = replace(
    HUB_HF_DINOV2, name="dinov2-hub-to-hf/dinov2-registers", family="dinov2-registers"
)

_FORWARD = (
    TIMM_HF_DINOV2,
    TIMM_HF_DINOV2_REG,
    HUB_HF_DINOV2,
    HUB_HF_DINOV2_REG,
    TIMM_HF_VIT,
    APPLE_HF_AIMV2,
)
_INVERSES = (
    TIMM_HF_DINOV2.inverse("hf-to-timm/dinov2"),
    TIMM_HF_DINOV2_REG.inverse("hf-to-timm/dinov2-registers"),
    TIMM_HF_VIT.inverse("hf-to-timm/vit"),
)

TABLES: dict[tuple[str, str, str], Table] = {
    (t.source, t.target, t.family): t for t in (*_FORWARD, *_INVERSES)
}

# Output groups that a dropped tensor leaves without a counterpart, so they are not compared.
DROPPED_GROUPS: dict[str, str] = {POOLER: "pooled"}


def table_for(source: str, target: str, family: str) -> Table | None:
    return TABLES.get((source, target, family))
