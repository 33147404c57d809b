"""The runner shape and the Setup record (vitport.runtimes.base), apart from any runtime."""

from __future__ import annotations

import json

import pytest

from vitport.cli.flags import cli_message
from vitport.errors import VitportError
from vitport.runtimes.base import LimitError, Limits, Runner, Setup


def test_setup_normalises_names_and_says_compile_one_way():
    setup = Setup("Torch", "bfloat16", fixes=["fp32-norm"])
    assert (setup.runtime, setup.dtype, setup.fixes) == ("torch", "bf16", ("fp32-norm",))
    assert Setup(compiled=True) == Setup("compile") == Setup("compile", compiled=True)
    assert Setup("compile").compiled and Setup(compiled=True).runtime == "compile"
    with pytest.raises(VitportError, match="compiled=True applies to the torch runtime"):
        Setup("onnxruntime", compiled=True)
    with pytest.raises(VitportError, match="attention=fast is unknown"):
        Setup(attention="fast")
    with pytest.raises(VitportError):
        Setup(dtype="fp7")


def test_setup_labels_and_cost_kinds_read_as_the_search_showed_them():
    assert Setup(dtype="bf16", attention="sdpa", compiled=True).label() == "bf16 sdpa compiled"
    assert Setup().label() == "fp32 default"
    assert Setup("openvino", "bf16").label() == "bf16 openvino"
    kinds = [Setup().cost_kind, Setup("onnxruntime").cost_kind, Setup("compile").cost_kind]
    assert kinds == ["eager", "built", "compiled"]


def test_setup_round_trips_through_json_and_reads_older_configs():
    setup = Setup("compile", "fp16", "sdpa", fixes=("erf-gelu", "fp32-norm"))
    assert Setup.from_dict(json.loads(json.dumps(setup.to_dict()))) == setup
    # optimize's Config before Setup: torch with compiled=True, no fixes
    old = {"dtype": "fp32", "attention": "default", "compiled": True, "runtime": "torch"}
    assert Setup.from_dict(old) == Setup("compile")


def test_a_batch_beyond_the_declared_limit_is_refused_in_one_line_naming_it():
    limits = Limits(("cuda",), ("fp32",), min_batch=1, max_batch=64)
    limits.check_batch("tensorrt", 64)
    with pytest.raises(LimitError) as caught:
        limits.check_batch("tensorrt", 128, "max_batch_size")
    message = str(caught.value)
    assert "\n" not in message and "max_batch_size 128" in message and "at most 64" in message
    assert caught.value.param == "max_batch_size" and caught.value.limit == 64
    assert cli_message(caught.value).startswith("--max-batch-size 128 is beyond")
    with pytest.raises(LimitError, match="batch_sizes 0 is below"):
        limits.check_batches("tensorrt", [8, 0])
    assert limits.cap(256) == 64 and Limits(("cpu",), ("fp32",)).cap(256) == 256


class _Planted(Runner):
    name = "planted"
    limits = Limits(("cpu",), ("fp32", "bf16"), max_batch=8)
    packages = ("no_such_package_for_vitport",)
    install = "pip install planted"

    def build(self, encoder, setup, cache):
        return encoder.forward_fn


def test_a_runner_says_why_it_does_not_apply_before_it_builds_anything():
    runner = _Planted()
    assert runner.missing() == "planted needs no_such_package_for_vitport: pip install planted"
    assert runner.not_applicable("cuda", "fp32") == "planted runs on cpu, not cuda"
    assert runner.not_applicable("cpu", "fp16") == "planted runs fp32, bf16, not fp16"
    assert runner.not_applicable("cpu", "bf16") is None
    _Planted.packages = ()
    try:
        assert runner.refusal("cpu", Setup("planted")) is None
        assert "attention 'eager'" in runner.refusal("cpu", Setup("planted", attention="eager"))
    finally:
        _Planted.packages = ("no_such_package_for_vitport",)
    assert runner.release() is None
