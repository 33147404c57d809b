"""Library errors name parameters; the CLI names its flags, from one table."""

from __future__ import annotations

import ast
import re

import pytest
from test_structure import modules

from vitport.cli.flags import FLAGS, cli_message, flag
from vitport.errors import VitportError


def test_each_spelling_of_a_parameter_becomes_its_flag():
    assert flag("batch_size") == "--batch-size"
    assert flag("batch_size=...") == "--batch-size"
    assert flag("overwrite=True") == "--overwrite"
    assert flag("to=") == "--to "
    assert flag("attention='flash'") == "--attn flash"
    assert flag("fixes") == FLAGS["fixes"] == "--fix"
    assert flag("check=False") == "--no-check"


def test_the_cli_names_flags_where_python_reads_parameters():
    error = VitportError(
        "budget applies to optimize=True; add optimize=True or drop budget",
        params=("budget", "optimize=True"),
    )
    assert cli_message(error) == "--budget applies to --optimize; add --optimize or drop --budget"
    assert "--" not in str(error)


def test_only_the_named_spellings_change_and_only_whole():
    error = VitportError(
        "batch_size must be at least 1 (batch_sizes, my_batch_size, x.batch_size stay)",
        params=("batch_size",),
    )
    assert cli_message(error) == (
        "--batch-size must be at least 1 (batch_sizes, my_batch_size, x.batch_size stay)"
    )
    assert cli_message(ValueError("batch_size")) == "batch_size"  # not a library error


def test_a_value_after_name_equals_follows_the_flag():
    error = VitportError("to=tflite: use one of hf, timm, onnx", params=("to=",))
    assert cli_message(error) == "--to tflite: use one of hf, timm, onnx"


CONVERTED = [
    "vitport.bench.configure",
    "vitport.bench.e2e",
    "vitport.cluster",
    "vitport.compare.check",
    "vitport.convert",
    "vitport.convert.engine",
    "vitport.convert.layouts",
    "vitport.convert.onnx",
    "vitport.device.core",
    "vitport.device.resolve",
    "vitport.embed",
    "vitport.embed.dedup",
    "vitport.embed.sources",
    "vitport.embed.store",
    "vitport.encoder",
    "vitport.families",
    "vitport.families.base",
    "vitport.families.hf",
    "vitport.families.loaded",
    "vitport.families.sources",
    "vitport.families.timm_vit",
    "vitport.faults",
    "vitport.golden",
    "vitport.outputs",
    "vitport.report",
    "vitport.runtimes",
    "vitport.serve.ray_engine",
    "vitport.runtimes.base",
    "vitport.runtimes.onnx",
    "vitport.runtimes.torch_runner",
    "vitport.runtimes.compile_runner",
    "vitport.runtimes.onnxruntime_runner",
    "vitport.runtimes.openvino_runner",
    "vitport.runtimes.tensorrt_runner",
    "vitport.runtimes.torchair_runner",
]
"""Modules whose errors name parameters, never flags. Left out: serve's app, inputs and service,
whose HTTP answers name the options the server was started with (--max-queue, ...)."""

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")
COMMAND = re.compile(r"vitport [a-z]+( --?[\w-]+( [A-Z]+)?)*")  # a shell command to run is kept


def error_messages(source: str) -> list[str]:
    """The string pieces of every `raise X(...)` and every `...Error(...)` built in a module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("Error"):
            for part in ast.walk(node):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    found.append(part.value)
    return found


@pytest.mark.parametrize("name", CONVERTED)
def test_library_errors_name_no_flag(name):
    messages = error_messages(modules()[name].read_text())
    flags = [m for m in messages if FLAG.search(COMMAND.sub("", m))]
    assert flags == []


def test_the_check_finds_a_flag():
    assert error_messages('raise VitportError(f"--out {x} is a file")') == ["--out ", " is a file"]
    assert FLAG.search("--out ") and not FLAG.search("vitport[serve-ray]")
    assert not FLAG.search(COMMAND.sub("", "write one with vitport infer --out FILE --with-blocks"))
