"""Planted faults: a registry of named faults, read as KIND@BLOCK."""

from __future__ import annotations

import pytest

from vitport.errors import VitportError
from vitport.faults import FAULTS, parse_fault


def test_faults_are_registered_in_a_stable_order():
    assert FAULTS.names() == ["gelu-tanh", "layernorm-bf16", "mlp-scale", "norm-swap"]
    assert all(FAULTS.get(n).name == n and FAULTS.get(n).cure for n in FAULTS.names())


def test_parse_fault_reads_kind_and_block_in_any_spelling():
    assert parse_fault("gelu-tanh@7") == ("gelu-tanh", 7)
    assert parse_fault("LayerNorm_BF16@0") == ("layernorm-bf16", 0)


@pytest.mark.parametrize("text", ["gelu-erf@1", "gelu-tanh", "gelu-tanh@x"])
def test_parse_fault_refuses_what_it_cannot_read_in_one_line(text):
    with pytest.raises(VitportError) as info:
        parse_fault(text)
    assert "\n" not in str(info.value)
    assert all(name in str(info.value) for name in FAULTS.names())


def test_a_planted_fault_counts_its_modules_in_words(tiny_dir):
    import vitport
    from vitport.faults import inject

    encoder = vitport.load(str(tiny_dir("dinov2")))
    assert "(1 module);" in inject(encoder, "gelu-tanh@0")  # one MLP activation, not "1 modules"
    assert "(2 modules);" in inject(encoder, "layernorm-bf16@1")


def test_a_fix_with_nothing_to_change_counts_in_words(tiny_dir):
    import vitport
    from vitport.fixes import FIXES

    encoder = vitport.load(str(tiny_dir("dinov2")))
    FIXES.get("erf-gelu").apply(encoder)
    again = FIXES.get("erf-gelu").apply(encoder)
    assert again.changed == 0 and " modules)" in again.detail and " 1 " not in again.detail
