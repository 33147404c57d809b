"""One function makes an exception (or a tool's output) into one line."""

from __future__ import annotations

import ast

from test_structure import modules

from vitport.errors import one_line


def test_an_exception_gives_the_first_line_of_its_message():
    assert one_line(ValueError("bad size\nmore detail")) == "bad size"
    assert one_line(ValueError("  spaced   out \t words ")) == "spaced out words"
    assert one_line(OSError("disk full"), typed=True) == "OSError: disk full"


def test_an_exception_without_a_message_gives_its_type():
    assert one_line(KeyError()) == "KeyError"
    assert one_line(RuntimeError("  \n "), typed=True) == "RuntimeError"


def test_a_traceback_in_the_message_gives_its_last_line():
    text = (
        "ray::Replica.check() (pid=1, ip=127.0.0.1)\n"
        '  File "/app/model.py", line 3, in check\n'
        "    raise ValueError('weights do not fit')\n"
        "ValueError: weights do not fit\n"
    )
    assert one_line(RuntimeError(text)) == "ValueError: weights do not fit"


def test_a_tools_output_gives_its_last_line():
    stderr = "WARNING: retrying\nERROR: No matching distribution found for x==1\n\n"
    assert one_line(stderr) == "ERROR: No matching distribution found for x==1"
    assert one_line("") == "no output"


def test_a_long_line_is_cut_with_an_ellipsis():
    line = one_line(ValueError("x" * 500))
    assert len(line) == 200 and line.endswith("…")
    assert one_line(ValueError("x" * 500), limit=50) == "x" * 49 + "…"
    assert one_line(ValueError("x" * 200)) == "x" * 200


def test_no_module_cuts_a_message_to_its_first_line_itself():
    """`splitlines()[0]` on a message is one_line's job (text files may still be split)."""
    found = [
        name
        for name, path in modules().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Subscript)
        and "splitlines()" in ast.unparse(node.value)
        and "str(" in ast.unparse(node.value)
    ]
    assert found == []
