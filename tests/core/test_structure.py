"""The package's shape, checked: data flows one way, private framework names stay in the compat layer.

* Layers, bottom-up: ``errors`` -> ``compat`` -> ``core`` -> ``adapters`` -> the public assembly
  (``distclip/__init__.py``, ``clipper.py``, ``functional.py``, ...) -> ``integrations`` -> ``cli``
  (``distclip/__init__.py`` reaches the integrations' import paths lazily, on attribute access).
  A module imports only from its own layer or below (``TYPE_CHECKING`` imports included).
* No import cycle between distclip's modules.
* A private name of torch or of a framework (``obj._name``, ``getattr(obj, "_name")``, an import
  from a ``_private`` module) is read only under ``distclip/compat/``. distclip's own private names
  (defined somewhere in the package) are not framework names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

ROOT = REPO / "distclip"
FILES = sorted(ROOT.rglob("*.py"))
TREES = {path: ast.parse(path.read_text(), str(path)) for path in FILES}

# the layer of each top-level part of the package (a module not listed is the public assembly); the
# integrations' public import paths (distclip.deepspeed, ...) are aliases of integrations modules
LAYERS = {"errors": 0, "compat": 1, "core": 2, "adapters": 3, "integrations": 5, "accelerate": 5, "deepspeed": 5,
          "hf_trainer": 5, "lightning": 5, "olmo_core": 5, "torchft": 5, "torchtitan": 5, "cli": 6, "bench": 6, "mpi": 6, "__main__": 6}
ASSEMBLY = 4


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in FILES}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # distclip itself: the public API re-exports everything
        return ASSEMBLY
    return LAYERS.get(parts[1], ASSEMBLY)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, distclip module) of every import in the file, relative imports resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(TREES[path]):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "distclip"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "distclip":
                continue
            for alias in node.names:  # `from . import x` imports the module x when it is one
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub if sub in MODULES else target))
    return out


def test_the_scan_sees_the_package() -> None:
    assert {"distclip.core.clipper", "distclip.adapters.dtensor", "distclip.compat.pytorch"} <= set(MODULES)
    assert any(target == "distclip.core.config" for _, target in imports_of(MODULES["distclip.core.clipper"]))


def test_layers_import_only_downwards() -> None:
    wrong = []
    for module, path in MODULES.items():
        for line, target in imports_of(path):
            if layer(target) > layer(module):
                wrong.append(f"{module}:{line} imports {target} (layer {layer(target)} above {layer(module)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    graph = {m: {t for _, t in imports_of(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    for m in graph:  # a package's __init__ runs when any of its modules is imported: not an edge of its own
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    seen: dict[str, int] = {}  # 1: on the stack, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in seen:
                visit(nxt, stack + [nxt])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def own_private_names() -> set[str]:
    """Every ``_name`` distclip itself defines (functions, classes, attributes, variables, arguments)."""
    own: set[str] = set()
    for tree in TREES.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.arg):
                own.add(node.arg)
    return {n for n in own if n.startswith("_")}


def private_reads(path: Path, own: set[str]) -> list[str]:
    found = []
    for node in ast.walk(TREES[path]):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")) and node.attr not in own:
                found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            module = node.module or ""
            if any(p.startswith("_") and not p.startswith("__") for p in module.split(".")):
                found.append(f"{node.lineno}: from {module}")
            found += [f"{node.lineno}: {a.name} from {module}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and node.args[1].value.startswith("_") and not node.args[1].value.startswith("__")
              and node.args[1].value not in own):
            found.append(f"{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return found


def test_private_framework_names_are_read_only_in_the_compat_layer() -> None:
    own = own_private_names()
    outside = {module_name(p): private_reads(p, own) for p in FILES if "compat" not in p.relative_to(ROOT).parts}
    wrong = [f"{m}:{hit}" for m, hits in outside.items() for hit in hits]
    assert not wrong, "read these through distclip.compat.<framework>:\n" + "\n".join(wrong)


def test_the_private_read_check_can_fail() -> None:
    own = own_private_names()
    compat = [private_reads(p, own) for p in FILES if "compat" in p.relative_to(ROOT).parts]
    assert sum(len(hits) for hits in compat) >= 10  # the compat layer does read private names: the scan sees them


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("distclip.compat.") and m != "distclip.compat"))
def test_every_compat_module_says_what_it_was_checked_on(module: str) -> None:
    text = MODULES[module].read_text()
    assert "checked on" in text.lower() or "TESTED_TORCH" in text, module


def test_test_modules_import_helpers_not_each_other() -> None:
    """Shared code lives in tests/helpers (and fixtures in tests/conftest.py): no test module imports another."""
    tests = REPO / "tests"
    wrong = []
    for path in sorted(tests.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names] \
                if isinstance(node, ast.Import) else []
            wrong += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}" for n in names
                      if n.startswith("tests.") and n.rsplit(".", 1)[-1].startswith("test_")]
    assert not wrong, "\n".join(wrong)
