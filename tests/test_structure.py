"""The layout's promises, read from the source: no import cycle, one home for hooks, atomic
writes and backend calls, and a CLI that stays small."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

import vitport

PACKAGE = Path(vitport.__file__).parent
BACKEND = re.compile(r"^(torch_npu|torch\.(npu|cuda|backends\.cuda|backends\.cudnn))(\.\w+)*$")
CLI_MAX_LINES = 300


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, at any depth (functions included), except the bodies of ``if TYPE_CHECKING:``,
    which never run and so import nothing."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(name: str, source: str, known: Mapping[str, Path]) -> set[str]:
    """The package's modules that module `name` imports, relative imports resolved; importing a
    name from a package counts the submodule of that name where there is one. The parent
    package a submodule's import runs implicitly is not counted."""
    package = name if known[name].name == "__init__.py" else name.rpartition(".")[0]
    targets: list[str] = []
    for node in _runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets += [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
    found = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def dotted(node: ast.AST) -> str:
    """``torch.cuda.synchronize`` for that attribute chain; "" for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = dotted(node.value)
        return f"{head}.{node.attr}" if head else ""
    return ""


def backend_names(source: str) -> list[str]:
    """Where code names a backend module: attribute chains, imports, the names themselves and
    strings that are exactly a backend module's path (sys.modules keys, importlib names).
    Docstrings, comments and messages (sentences) do not count."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Attribute | ast.Name):
            names.append(dotted(node))
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.append(node.value)
        elif (
            isinstance(node, ast.Call)
            and dotted(node.func) in ("getattr", "hasattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
        ):
            names.append(f"{dotted(node.args[0])}.{node.args[1].value}")
        found += [m.group(1) for m in map(BACKEND.match, names) if m]
    return sorted(set(found))


def calls_of(source: str, callee: str) -> list[str]:
    """The functions (by qualified name; "<module>" at top level) that call `callee`."""
    found = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = child.name if where == "<module>" else f"{where}.{child.name}"
                visit(child, inner)
                continue
            if isinstance(child, ast.Call) and dotted(child.func) == callee:
                found.append(where)
            visit(child, where)

    visit(ast.parse(source), "<module>")
    return sorted(set(found))


def attribute_users(attr: str) -> set[str]:
    return {
        name
        for name, path in modules().items()
        if any(
            isinstance(n, ast.Attribute) and n.attr == attr
            for n in ast.walk(ast.parse(path.read_text()))
        )
    }


def docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes of a module, its classes and functions (prose, not code)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def registry_list(tree: ast.AST) -> set[int]:
    """The ids of the strings in the family registry's list of modules (``MODULES = (...)``),
    the one place that names every family module."""
    return {
        id(const)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["MODULES"]
        for const in ast.walk(node.value)
    }


def spelled(source: str, claims: Iterable[str]) -> list[str]:
    """The claimed model types and class names that code spells: a claim standing alone in a
    string (not inside a longer name such as ``vit_small``, ``demo:dinov2-small`` or a glob
    ``*vit*``), or a name or attribute that is one. Docstrings, comments, import paths and the
    registry's list of modules do not count."""
    tree = ast.parse(source)
    prose = docstrings(tree) | registry_list(tree)
    patterns = {c: re.compile(rf"(?<![\w*-]){re.escape(c)}(?![\w*-])") for c in claims}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            found += [c for c, p in patterns.items() if p.search(node.value)]
        elif isinstance(node, ast.Name | ast.Attribute | ast.alias):
            # as a name, only a class counts: a model type such as clip is also numpy's np.clip
            classes = [c for c in claims if c[:1].isupper()]
            word = {ast.Name: "id", ast.Attribute: "attr", ast.alias: "asname"}[type(node)]
            found += [c for c in classes if getattr(node, word, None) == c]
            if isinstance(node, ast.alias):
                found += [c for c in classes if node.name.rpartition(".")[2] == c]
    return sorted(set(found))


# ------------------------------------------------------------------ the checks themselves


def test_the_checks_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    known = {"p": Path("p/__init__.py"), "p.a": Path("p/a.py"), "p.b": Path("p/b.py")}
    source = "from . import b\ndef f():\n    from p import a\nif TYPE_CHECKING:\n    import p\n"
    assert imports_of("p.a", source, known) == {"p.b"}
    assert imports_of("p", "from .a import x\nimport p.b.c", known) == {"p.a", "p.b"}
    code = "import torch_npu\nx = torch.cuda.is_available()\ny = getattr(torch, 'npu')\n"
    assert backend_names(code) == ["torch.cuda", "torch.npu", "torch_npu"]
    assert backend_names('"""torch_npu and torch.cuda"""\nmsg = "needs torch_npu"') == []
    assert calls_of("def f():\n    os.replace(a, b)\nos.replace(c, d)", "os.replace") == [
        "<module>",
        "f",
    ]
    claims = ("vit", "Dinov2Model")
    code = 'KINDS = {"vit": 1}\nm = transformers.Dinov2Model\nfrom transformers import Dinov2Model'
    assert spelled(code, claims) == ["Dinov2Model", "vit"]
    assert spelled('"""A vit."""\nname = "vit_small"\nspec = "demo:vit-s"  # vit', claims) == []
    assert spelled('prefix = f"{x}vit."', claims) == ["vit"]
    assert spelled('MODULES = ("vit",)\nOTHER = ("vit",)', claims) == ["vit"]
    assert spelled("x = np.vit(a)\nvit = 1", claims) == []  # a function or variable, not a type


def test_no_import_cycle():
    known = modules()
    graph = {name: imports_of(name, path.read_text(), known) for name, path in known.items()}
    assert cycles(graph) == []


def test_forward_hooks_are_installed_in_hooks_only():
    assert attribute_users("register_forward_hook") == {"vitport.hooks"}
    assert attribute_users("register_forward_pre_hook") <= {"vitport.hooks"}


def test_one_function_replaces_files():
    callers = {
        f"{name}:{where}"
        for name, path in modules().items()
        for where in calls_of(path.read_text(), "os.replace")
    }
    assert callers == {"vitport.outputs:write_atomic"}
    renamed = [
        name
        for name, path in modules().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and node.module == "os"
        and any(alias.name == "replace" for alias in node.names)
    ]
    assert renamed == []  # os.replace under another name would escape the count above


@pytest.mark.parametrize("name", [n for n in modules() if not n.startswith("vitport.device")])
def test_backends_are_named_in_device_only(name):
    assert backend_names(modules()[name].read_text()) == []


@pytest.mark.parametrize("name", [n for n in modules() if n.startswith("vitport.cli.")])
def test_cli_modules_stay_small(name):
    assert len(modules()[name].read_text().splitlines()) < CLI_MAX_LINES


def family_modules() -> dict[str, str]:
    """Each registered family's name and the dotted name of the module that defines it."""
    import importlib

    from vitport.families.base import MODULES, registry

    registry()
    return {
        importlib.import_module(f"vitport.families.{m}").FAMILY.name: f"vitport.families.{m}"
        for m in MODULES
    }


@pytest.mark.parametrize("family", list(family_modules()))
def test_a_family_is_named_in_its_own_module_only(family):
    """No model type or transformers class a family claims is spelled outside its module."""
    from vitport.families.base import registry

    own = family_modules()[family]
    claims = registry().get(family).claims()
    strays = {
        name: found
        for name, path in modules().items()
        if name != own and (found := spelled(path.read_text(), claims))
    }
    assert strays == {}
