"""The one Registry: get, names, parse, one normalisation and one error."""

from __future__ import annotations

import pytest

from vitport.errors import VitportError
from vitport.registry import Registry, UnknownNameError


def make() -> Registry[int]:
    reg: Registry[int] = Registry("fix", param="fixes")
    reg.register("erf-gelu", 1)
    reg.register("fp32_softmax", 2)
    return reg


def test_get_normalises_case_and_separators():
    reg = make()
    assert reg.get("ERF_GELU") == 1
    assert reg.get(" fp32-softmax ") == 2
    assert reg.names() == ["erf-gelu", "fp32-softmax"]
    assert "Erf_Gelu" in reg and "nope" not in reg and len(reg) == 2


def test_unknown_name_is_one_line_naming_the_choices_and_the_parameter():
    with pytest.raises(UnknownNameError) as err:
        make().get("gelu")
    assert isinstance(err.value, VitportError)
    assert str(err.value) == "unknown fix 'gelu'; choose one of erf-gelu, fp32-softmax"
    assert err.value.param == "fixes" and "\n" not in str(err.value)


def test_parse_splits_dedups_and_expands_all():
    reg = make()
    assert reg.parse("fp32_softmax, erf-gelu,fp32-softmax") == ["fp32-softmax", "erf-gelu"]
    assert reg.parse(["erf-gelu"]) == ["erf-gelu"]
    assert reg.parse(None) == [] and reg.parse("") == []
    assert reg.parse("all", allow_all=True) == ["erf-gelu", "fp32-softmax"]
    with pytest.raises(UnknownNameError, match="choose one of erf-gelu, fp32-softmax, all"):
        reg.parse("erf-gelu,bogus", allow_all=True)


def test_registering_a_name_twice_is_refused():
    reg = make()
    with pytest.raises(ValueError, match="twice"):
        reg.register("Erf_Gelu", 3)
