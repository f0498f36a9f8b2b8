"""The layout rule, checked on the repository itself: the folders are layers and imports point down only
(vit <- loaders <- peft <- peft.finetune, peft.bench <- peft.cli), there is no import cycle (not even through an
import inside a function), no source file is longer than MAX_LINES, and the list of methods is defined once, in the
registry.

The checker is written here as plain functions of a folder, so the tests below also run it on small trees that
break each rule and see it fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vit", "loaders", "peft")
MAX_LINES = 450
# Layer of a module: the longest matching prefix wins. A module may import its own layer and the ones below.
LAYERS = {"vit": 0, "loaders": 1, "peft": 2, "peft.finetune": 3, "peft.bench": 3, "peft.cli": 4}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages (a package is its __init__.py)."""
    found = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" in f.parts:
                continue
            parts = f.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return found


def imported(name: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute names an import statement may load: the module and, for ``from M import x``, ``M.x`` too."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = package[:len(package) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
    else:
        stem = node.module or ""
    return [stem] + [f"{stem}.{a.name}" for a in node.names]


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in the file (functions included). Edges between a module
    and its own enclosing packages are left out: importing one's package __init__ is no design cycle."""
    mods = modules(root)
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in imported(m, f, node):
                while target and target not in mods:  # `from pkg import function`: the module that holds it
                    target = target.rpartition(".")[0]
                if target and target != m and not (m.startswith(target + ".") or target.startswith(m + ".")):
                    graph[m].add(target)
    return graph


def layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts if layer(t) > layer(m))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach each other (strongly connected components of more than one module)."""
    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for t in graph[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return seen

    reached = {m: reach(m) for m in graph}
    groups = {frozenset([m] + [t for t in reached[m] if m in reached[t]]) for m in graph if m in reached[m]}
    return sorted(sorted(g) for g in groups if len(g) > 1)


def long_files(root: Path, max_lines: int = MAX_LINES) -> list[str]:
    files = [f for pkg in (*PACKAGES, "tools") for f in (root / pkg).rglob("*")
             if f.suffix in (".py", ".sh", ".cu", ".cpp", ".h") and "__pycache__" not in f.parts]
    return sorted(f"{f.relative_to(root)}: {n} lines" for f in files
                  if (n := len(f.read_text().splitlines())) > max_lines)


def method_list_definitions(root: Path, names: set[str]) -> list[str]:
    """Where the list of methods is written out: a literal tuple/list/set (or dict keys) that names every registered
    method, or one assigned to MODES / METHOD_NAMES. The registry derives the list from its entries; at most one
    place may spell it out."""
    found = []
    for f in sorted(list(modules(root).values()) + sorted((root / "tools").glob("*.py"))):
        rel = f.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            literal = isinstance(getattr(node, "value", None), (ast.Tuple, ast.List, ast.Set))
            if literal and any(isinstance(t, ast.Name) and t.id in ("MODES", "METHOD_NAMES") for t in targets):
                found.append(f"{rel}:{node.lineno} spells out {targets[0].id}")
            items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else \
                node.keys if isinstance(node, ast.Dict) else None
            if items and names <= {i.value for i in items if isinstance(i, ast.Constant)}:
                found.append(f"{rel}:{node.lineno} lists every method")
    return found


def registered_methods() -> set[str]:
    import peft

    return set(getattr(peft, "METHOD_NAMES", None) or peft.MODES)


# ── the repository itself ───────────────────────────────────────────────────────────────────────────────────

@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT)


def test_the_checker_sees_the_project(graph):
    assert {"vit.model", "loaders.npz", "peft.registry", "peft.finetune.trainer", "peft.cli.finetune"} <= set(graph)
    assert "vit.model" in graph["loaders.npz"]
    assert any(t.startswith("peft.finetune") for t in graph["peft.cli.finetune"])


def test_no_upward_import(graph):
    assert upward_imports(graph) == []


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_no_source_file_is_too_long():
    assert long_files(ROOT) == []


def test_the_method_list_is_defined_once():
    names = registered_methods()
    assert len(names) >= 10
    places = {d.split()[0] for d in method_list_definitions(ROOT, names)}  # file:line (one literal may be both)
    assert len(places) <= 1, places


# ── the checker fails where it should ───────────────────────────────────────────────────────────────────────

def tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name in ("vit/__init__.py", "loaders/__init__.py", "peft/__init__.py", "peft/finetune/__init__.py",
                 "peft/cli/__init__.py", "peft/modes.py"):
        files.setdefault(name, "")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "tools").mkdir(exist_ok=True)
    return tmp_path


def test_an_upward_import_inside_a_function_is_found(tmp_path):
    root = tree(tmp_path, {"vit/model.py": "def f():\n    from loaders import npz\n", "loaders/npz.py": "",
                           "peft/finetune/run.py": "from ..cli import main\n", "peft/cli/main.py": "",
                           "peft/rlrr.py": "from .finetune import run\n"})
    assert upward_imports(import_graph(root)) == [
        "peft.finetune.run -> peft.cli", "peft.finetune.run -> peft.cli.main",  # the package and the module
        "peft.rlrr -> peft.finetune", "peft.rlrr -> peft.finetune.run", "vit.model -> loaders", "vit.model -> loaders.npz"]


def test_a_cycle_is_found_and_a_package_importing_its_modules_is_not_one(tmp_path):
    root = tree(tmp_path, {"peft/a.py": "from . import b\n", "peft/b.py": "def f():\n    import peft.c\n",
                           "peft/c.py": "from .a import x\n", "peft/d.py": "from peft import a\n",
                           "peft/__init__.py": "from .d import y\n"})
    assert cycles(import_graph(root)) == [["peft.a", "peft.b", "peft.c"]]


def test_a_long_file_is_found(tmp_path):
    root = tree(tmp_path, {"peft/big.py": "x = 1\n" * (MAX_LINES + 1), "peft/ok.py": "x = 1\n" * MAX_LINES})
    assert long_files(root) == [f"peft/big.py: {MAX_LINES + 1} lines"]


def test_a_second_method_list_is_found(tmp_path):
    names = {"rlrr", "lora", "head"}
    root = tree(tmp_path, {"peft/modes.py": "MODES = tuple(METHODS)\nALIAS = MODES\n",
                           "peft/cli/x.py": "CHOICES = ['head', 'lora', 'rlrr']\nLR = {'head': 1, 'lora': 2}\n",
                           "peft/bench/y.py": "METHOD_NAMES = ('a',)\n"})
    assert method_list_definitions(root, names) == ["peft/bench/y.py:1 spells out METHOD_NAMES",
                                                    "peft/cli/x.py:1 lists every method"]
