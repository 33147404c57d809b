"""Numerical fixes: each finds its targets by type, changes them, and says what it changed."""

from __future__ import annotations

import dataclasses
import sys
import types
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from torch import nn

import vitport
from vitport.device import Device
from vitport.errors import VitportError
from vitport.families.base import families
from vitport.fixes import (
    FIXES,
    ExactGELU,
    FP32Attention,
    FP32LayerNorm,
    FP32Norm,
    FP32RMSNorm,
    SDPAForward,
    apply_fixes,
    fix_names,
    parse_fixes,
)

NAMES = ["erf-gelu", "layernorm-fp32", "attention-fp32", "math-sdpa", "no-tf32"]


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pixels_once() -> torch.Tensor:
    return torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def strict_settings_restored():
    """Save and restore the process-wide settings no-tf32 changes."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (
        matmul.allow_tf32,
        cudnn.allow_tf32,
        matmul.allow_fp16_reduced_precision_reduction,
        matmul.allow_bf16_reduced_precision_reduction,
        torch.get_float32_matmul_precision(),
    )
    yield
    matmul.allow_tf32 = saved[0]
    cudnn.allow_tf32 = saved[1]
    matmul.allow_fp16_reduced_precision_reduction = saved[2]
    matmul.allow_bf16_reduced_precision_reduction = saved[3]
    torch.set_float32_matmul_precision(saved[4])


def load(tiny_dir, name: str) -> vitport.Encoder:
    return vitport.load(str(tiny_dir(name)))


def out(encoder: vitport.Encoder, pixels: torch.Tensor) -> torch.Tensor:
    """Every output group of one run, flattened into one float32 vector."""
    side = encoder.image_size
    batch = F.interpolate(pixels, size=side) if tuple(pixels.shape[-2:]) != side else pixels
    groups = encoder.encode(batch).groups()
    return torch.cat([t.float().flatten() for t in groups.values()])


def swap_first(root: nn.Module, match, new: nn.Module) -> nn.Module:
    """Replace the first descendant of `root` for which match(module) holds; return it."""
    for parent in root.modules():
        for name, child in parent.named_children():
            if match(child):
                setattr(parent, name, new)
                return child
    raise AssertionError("no module to replace")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- registry, parsing


def test_registry_lists_every_fix_in_a_stable_order():
    assert fix_names() == NAMES
    assert list(FIXES) == NAMES
    assert all(FIXES.get(n).name == n and FIXES.get(n).help for n in NAMES)


def test_parse_fixes_reads_lists_all_and_keeps_order():
    assert parse_fixes("erf-gelu,layernorm-fp32") == ["erf-gelu", "layernorm-fp32"]
    assert parse_fixes(["math-sdpa", " erf_gelu ,"]) == ["math-sdpa", "erf-gelu"]
    assert parse_fixes("all") == NAMES
    assert parse_fixes("no-tf32,all") == ["no-tf32", *NAMES[:4]]
    assert parse_fixes(None) == []
    assert parse_fixes("") == []


def test_parse_fixes_refuses_unknown_names_in_one_line():
    with pytest.raises(VitportError, match="unknown fix 'gelu-erf'") as info:
        parse_fixes("erf-gelu,gelu-erf")
    message = str(info.value)
    assert "\n" not in message
    assert all(name in message for name in NAMES)


def test_apply_fixes_refuses_unknown_names(tiny_dir):
    with pytest.raises(VitportError, match="unknown fix 'fast'"):
        apply_fixes(load(tiny_dir, "dinov2"), ["fast"])


# --------------------------------------------------------------------------- erf-gelu


def tanh_gelus(encoder: vitport.Encoder) -> None:
    """Plant the tanh approximation in every GELU of the blocks."""
    for block in encoder.blocks:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.GELU) or "gelu" in type(child).__name__.lower():
                    setattr(parent, name, nn.GELU(approximate="tanh"))


def test_erf_gelu_cures_a_tanh_gelu(tiny_dir, pixels):
    clean, encoder = load(tiny_dir, "dinov2"), load(tiny_dir, "dinov2")
    is_gelu = lambda m: type(m).__name__ == "GELUActivation"  # noqa: E731
    swap_first(encoder.blocks[1], is_gelu, nn.GELU(approximate="tanh"))
    reference = out(clean, pixels)
    assert max_diff(out(encoder, pixels), reference) > 1e-6

    (report,) = apply_fixes(encoder, ["erf-gelu"])

    assert report.name == "erf-gelu"
    assert report.changed == 1 == len(report.targets)  # block 0's GELU is already exact
    assert report.targets == ("encoder.layer.1.mlp.activation_fn",)
    assert report.detail.startswith("replaced 1 GELU module (GELU) with exact erf GELU")
    assert "torch.nn.functional.gelu approximate='none'" in report.detail
    assert report.detail.endswith("; 1 already exact")
    assert "ExactGELU(npu=False)" in repr(encoder.module)
    assert not any(type(m) is nn.GELU for m in encoder.module.modules())
    torch.testing.assert_close(out(encoder, pixels), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("gelu", "exact"),
    [("none", True), ("tanh", False), ("quick", False)],
)
def test_erf_gelu_changes_only_gelus_that_are_not_exact(gelu, exact, tiny_dir):
    from transformers.activations import QuickGELUActivation

    encoder = load(tiny_dir, "vit")
    for block in encoder.blocks:
        module = QuickGELUActivation() if gelu == "quick" else nn.GELU(approximate=gelu)
        swap_first(block, lambda m: "gelu" in type(m).__name__.lower(), module)
    (report,) = apply_fixes(encoder, ["erf-gelu"])
    assert report.changed == (0 if exact else 2)
    assert ("already exact: nothing to change" in report.detail) == exact


@pytest.mark.parametrize("name", ["dinov2", "vit", "dinov3_vit", "timm_vit_reg4"])
def test_erf_gelu_on_an_exact_gelu_says_nothing_to_change(name, tiny_dir, pixels):
    encoder = load(tiny_dir, name)
    (report,) = apply_fixes(encoder, ["erf-gelu"])
    assert (report.changed, report.targets) == (0, ())
    assert report.detail.startswith("already exact: nothing to change (2 ")
    assert not any(isinstance(m, ExactGELU) for m in encoder.module.modules())


@pytest.mark.parametrize("name", ["vit", "dinov3_vit", "timm_vit_reg4"])
def test_erf_gelu_finds_gelus_by_type_in_every_family(name, tiny_dir, pixels):
    encoder = load(tiny_dir, name)
    before = out(encoder, pixels)
    tanh_gelus(encoder)
    (report,) = apply_fixes(encoder, ["erf-gelu"])
    assert report.changed == 2
    exact = [n for n, m in encoder.module.named_modules() if isinstance(m, ExactGELU)]
    assert tuple(exact) == report.targets
    torch.testing.assert_close(out(encoder, pixels), before, atol=1e-6, rtol=0)


def test_erf_gelu_on_timm_names_the_mlp_activations(tiny_dir):
    encoder = load(tiny_dir, "timm_vit_reg4")
    tanh_gelus(encoder)
    (report,) = apply_fixes(encoder, ["erf-gelu"])
    assert report.targets == ("blocks.0.mlp.act", "blocks.1.mlp.act")


def test_erf_gelu_refuses_a_model_without_gelu(tiny_dir):
    encoder = load(tiny_dir, "aimv2")
    with pytest.raises(VitportError, match="changed nothing.*no GELU.*SiLU"):
        apply_fixes(encoder, ["erf-gelu"])


def test_erf_gelu_twice_reports_nothing_new(tiny_dir):
    encoder = load(tiny_dir, "dinov2")
    tanh_gelus(encoder)
    first, second = apply_fixes(encoder, ["erf-gelu", "erf-gelu"])
    assert (first.changed, second.changed) == (2, 0)
    assert second.detail.startswith("already exact: nothing to change")


def fake_torch_npu(calls: list[str]) -> types.ModuleType:
    module = types.ModuleType("torch_npu")

    def npu_gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
        calls.append(approximate)
        return F.gelu(x, approximate=approximate)

    module.npu_gelu = npu_gelu  # type: ignore[attr-defined]
    return module


def test_erf_gelu_on_npu_uses_the_npu_kernel(tiny_dir, pixels, monkeypatch):
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu(calls))
    clean, encoder = load(tiny_dir, "dinov2"), load(tiny_dir, "dinov2")
    on_npu = dataclasses.replace(encoder, device=Device("npu", 0))  # shares the module

    (report,) = apply_fixes(on_npu, ["erf-gelu"])

    assert report.changed == 2
    assert "torch_npu.npu_gelu approximate='none'" in report.detail
    assert "ExactGELU(npu=True)" in repr(encoder.module)
    exact = [m for m in encoder.module.modules() if isinstance(m, ExactGELU)]
    assert [m.npu for m in exact] == [True, True]
    result = out(encoder, pixels)  # runs on the CPU, through the stand-in kernel
    assert calls == ["none", "none"]
    torch.testing.assert_close(result, out(clean, pixels), atol=1e-6, rtol=0)

    (again,) = apply_fixes(encoder, ["erf-gelu"])  # back on the CPU: the choice follows
    assert again.changed == 0
    assert "ExactGELU(npu=True)" not in repr(encoder.module)


def test_erf_gelu_on_npu_without_torch_npu_fails_loudly(tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ImportError
    encoder = load(tiny_dir, "dinov2")
    with pytest.raises(VitportError, match="torch_npu"):
        apply_fixes(dataclasses.replace(encoder, device=Device("npu", 0)), ["erf-gelu"])


# --------------------------------------------------------------------------- layernorm-fp32


class BF16LayerNorm(nn.LayerNorm):
    """A faulty LayerNorm that computes in bfloat16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.bfloat16(), self.bias.bfloat16()
        return F.layer_norm(x.bfloat16(), self.normalized_shape, w, b, self.eps).float()


class OffsetRMSNorm(nn.Module):
    """An RMSNorm of other semantics (Gemma's ``1 + weight``): no formula may replace it."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden) * 0.1)
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


@pytest.mark.parametrize("name", ["dinov2", "aimv2"])
def test_layernorm_fp32_on_a_float32_model_has_nothing_to_change(name, tiny_dir, pixels):
    encoder = load(tiny_dir, name)
    (report,) = apply_fixes(encoder, ["layernorm-fp32"])
    assert (report.changed, report.targets) == (0, ())
    assert report.detail.startswith("already float32: nothing to change (5 ")
    assert not any(isinstance(m, (FP32LayerNorm, FP32RMSNorm)) for m in encoder.module.modules())


def test_layernorm_fp32_swaps_only_the_norms_that_are_not_float32(tiny_dir, pixels):
    encoder = load(tiny_dir, "dinov2")
    for block in encoder.blocks:  # every norm of the blocks computes in bf16; the final one not
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.LayerNorm:
                    faulty = BF16LayerNorm(32, eps=1e-6)
                    faulty.load_state_dict(child.state_dict())
                    setattr(parent, name, faulty)
    keys = set(encoder.module.state_dict())

    (report,) = apply_fixes(encoder, ["layernorm-fp32"])

    assert report.changed == 4  # 2 blocks x 2 norms
    assert "layernorm" not in report.targets
    assert report.detail.endswith("; 1 already float32")
    assert "FP32LayerNorm((32,), eps=1e-06)" in repr(encoder.module)
    assert sum(isinstance(m, FP32LayerNorm) for m in encoder.module.modules()) == 4
    assert set(encoder.module.state_dict()) == keys


def test_layernorm_fp32_cures_a_bf16_layernorm(tiny_dir, pixels):
    clean, encoder = load(tiny_dir, "dinov2"), load(tiny_dir, "dinov2")
    faulty = BF16LayerNorm(32, eps=1e-6)
    original = swap_first(encoder.blocks[0], lambda m: isinstance(m, nn.LayerNorm), faulty)
    faulty.load_state_dict(original.state_dict())
    reference = out(clean, pixels)
    assert max_diff(out(encoder, pixels), reference) > 1e-4

    apply_fixes(encoder, ["layernorm-fp32"])

    assert not any(isinstance(m, BF16LayerNorm) for m in encoder.module.modules())
    torch.testing.assert_close(out(encoder, pixels), reference, atol=1e-6, rtol=0)


def bf16_rms_norm(self, x: torch.Tensor) -> torch.Tensor:
    h = x.bfloat16()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return (self.weight.bfloat16() * h).float()


def test_layernorm_fp32_handles_rmsnorm(tiny_dir, pixels):
    encoder = load(tiny_dir, "aimv2")
    for module in encoder.module.modules():  # every RMSNorm computes in bf16
        if type(module).__name__ == "Aimv2RMSNorm":
            module.__class__ = type("Aimv2RMSNorm", (type(module),), {"forward": bf16_rms_norm})
    (report,) = apply_fixes(encoder, ["layernorm-fp32"])
    assert report.changed == 5
    assert "Aimv2RMSNorm" in report.detail
    assert sum(isinstance(m, FP32RMSNorm) for m in encoder.module.modules()) == 5


class LowOffsetRMSNorm(OffsetRMSNorm):
    """OffsetRMSNorm computed in its input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return h * (1.0 + self.weight)


def test_layernorm_fp32_wraps_a_norm_it_has_no_formula_for(tiny_dir, pixels):
    encoder = load(tiny_dir, "aimv2")
    swap_first(encoder.blocks[0], lambda m: "RMSNorm" in type(m).__name__, LowOffsetRMSNorm(32))
    encoder = encoder.to(dtype=torch.bfloat16)
    apply_fixes(encoder, ["layernorm-fp32"])
    wrapped = [m for m in encoder.module.modules() if isinstance(m, FP32Norm)]
    assert len(wrapped) == 1 and isinstance(wrapped[0].inner, OffsetRMSNorm)


# --------------------------------------------------------------------------- attention-fp32


def test_attention_fp32_on_a_float32_model_has_nothing_to_change(tiny_dir, pixels):
    encoder = load(tiny_dir, "dinov2")
    (report,) = apply_fixes(encoder, ["attention-fp32"])
    assert (report.changed, report.targets) == (0, ())
    assert report.detail.startswith("already float32 (the model runs in fp32): nothing to change")
    assert not any(isinstance(b.attention, FP32Attention) for b in encoder.blocks)
    bf16 = load(tiny_dir, "dinov2").to(dtype=torch.bfloat16)
    (report,) = apply_fixes(bf16, ["attention-fp32"])
    assert report.targets == ("encoder.layer.0.attention", "encoder.layer.1.attention")


@pytest.mark.parametrize("name", ["dinov2", "aimv2"])
def test_attention_fp32_brings_bf16_closer_to_fp32(name, tiny_dir, pixels):
    encoder = load(tiny_dir, name)
    reference = out(encoder, pixels)
    plain = out(encoder.to(dtype=torch.bfloat16), pixels)
    fixed_encoder = encoder.to(dtype=torch.bfloat16)
    (report,) = apply_fixes(fixed_encoder, ["attention-fp32"])
    fixed = out(fixed_encoder, pixels)
    assert report.changed == 2
    assert not torch.equal(fixed, plain)
    assert (fixed - reference).norm() < (plain - reference).norm()


def test_attention_fp32_brings_a_bf16_timm_attention_closer_to_fp32(tiny_dir):
    """timm's LayerScale (1e-5) hides attention in the model output: check the module itself."""
    encoder = load(tiny_dir, "timm_vit_reg4")
    tokens = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = encoder.blocks[0].attn(tokens)
        bf16 = encoder.to(dtype=torch.bfloat16)
        plain = bf16.blocks[0].attn(tokens.bfloat16())
        (report,) = apply_fixes(bf16, ["attention-fp32"])
        fixed = bf16.blocks[0].attn(tokens.bfloat16())
    assert report.targets == ("blocks.0.attn", "blocks.1.attn")
    assert isinstance(bf16.blocks[0].attn, FP32Attention)
    assert fixed.dtype == torch.bfloat16
    assert (fixed.float() - reference).norm() < (plain.float() - reference).norm()


# --------------------------------------------------------------------------- math-sdpa


def test_math_sdpa_runs_the_forward_in_the_math_backend(tiny_dir, pixels):
    encoder = load(tiny_dir, "dinov2")
    before = out(encoder, pixels)
    seen: list[tuple[bool, bool]] = []
    original = encoder.forward_fn

    def spy(module, batch):
        seen.append(
            (torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())
        )
        return original(module, batch)

    encoder.forward_fn = spy
    (report,) = apply_fixes(encoder, ["math-sdpa"])

    assert report.changed == 1
    assert report.detail.startswith("forward runs with SDPA math backend")
    assert isinstance(encoder.forward_fn, SDPAForward)
    torch.testing.assert_close(out(encoder, pixels), before, atol=1e-6, rtol=0)
    assert seen == [(True, False)]
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after the forward
    (again,) = apply_fixes(encoder, ["math-sdpa"])
    assert again.changed == 0


# --------------------------------------------------------------------------- no-tf32


def strict_state() -> tuple:
    matmul = torch.backends.cuda.matmul
    return (
        matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        matmul.allow_fp16_reduced_precision_reduction,
        matmul.allow_bf16_reduced_precision_reduction,
        torch.get_float32_matmul_precision(),
    )


@pytest.mark.usefixtures("strict_settings_restored")
def test_no_tf32_makes_float32_math_strict(tiny_dir):
    encoder = load(tiny_dir, "dinov2")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True

    (report,) = apply_fixes(encoder, ["no-tf32"])

    assert strict_state() == (False, False, False, False, "highest")
    assert "torch.backends.cuda.matmul.allow_tf32" in report.targets
    assert "torch.backends.cudnn.allow_tf32" in report.targets
    assert report.changed == len(report.targets) >= 3
    (again,) = apply_fixes(encoder, ["no-tf32"])  # already strict: not an error
    assert again.changed == 0 and again.detail.startswith("already strict: nothing to change")


@pytest.mark.usefixtures("strict_settings_restored")
def test_no_tf32_turns_off_ascend_hf32(tiny_dir, monkeypatch):
    npu = types.SimpleNamespace(
        matmul=types.SimpleNamespace(allow_hf32=True), conv=types.SimpleNamespace(allow_hf32=True)
    )
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    (report,) = apply_fixes(load(tiny_dir, "dinov2"), ["no-tf32"])
    assert npu.matmul.allow_hf32 is False and npu.conv.allow_hf32 is False
    assert {"torch.npu.matmul.allow_hf32", "torch.npu.conv.allow_hf32"} <= set(report.targets)


# --------------------------------------------------------------------------- all fixes


FAMILY_MODELS = [(f.name, t.name) for f in families() for t in f.tiny]


def test_every_family_that_loads_models_brings_a_tiny_one():
    """So that the registry-wide tests below cover it (demo is a source, not a family of its own)."""
    assert [f.name for f in families() if f.loader and not f.tiny] == []


@pytest.fixture(scope="module")
def fp32_runs(tiny_dir, pixels_once) -> Callable[[str], tuple[vitport.Encoder, torch.Tensor]]:
    """run(name) -> a fresh copy of that tiny model (fp32, CPU) and its outputs as loaded."""
    loaded: dict[str, tuple[vitport.Encoder, torch.Tensor]] = {}

    def run(name: str) -> tuple[vitport.Encoder, torch.Tensor]:
        if name not in loaded:
            encoder = load(tiny_dir, name)
            loaded[name] = (encoder, out(encoder, pixels_once))
        encoder, before = loaded[name]
        return encoder.to(copy=True), before

    return run


@pytest.mark.usefixtures("strict_settings_restored")
@pytest.mark.parametrize("fix", fix_names())
@pytest.mark.parametrize(("family", "model"), FAMILY_MODELS, ids=[m for _, m in FAMILY_MODELS])
def test_no_fix_changes_a_models_own_function(family, model, fix, fp32_runs, pixels_once):
    """A fix never changes a model's own function: in fp32 on the CPU, every registered fix on
    every registered family's tiny models leaves the outputs as they were (within fp32 rounding)
    or says, in one line, that it does not apply and then changed nothing at all."""
    encoder, before = fp32_runs(model)
    try:
        (report,) = apply_fixes(encoder, [fix])
    except VitportError as exc:
        assert str(exc).startswith(f"fix '{fix}' changed nothing: ") and "\n" not in str(exc)
        assert torch.equal(out(encoder, pixels_once), before)
        return
    assert report.name == fix
    assert (report.changed == 0) == ("nothing to change" in report.detail)
    torch.testing.assert_close(out(encoder, pixels_once), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(TINY))
def test_float32_fixes_do_change_a_bf16_model(name, tiny_dir, pixels):
    bf16 = load(tiny_dir, name).to(dtype=torch.bfloat16)
    assert torch.isfinite(out(bf16, pixels)).all()
    (report,) = apply_fixes(bf16, ["attention-fp32"])
    assert report.changed > 0
    assert torch.isfinite(out(bf16, pixels)).all()
