"""ARCHITECTURE.md's rooms hold: every import of the library, late ones included, points down its table of layers.

The table is read from ARCHITECTURE.md itself, so the document and the code cannot drift apart: a module the
table does not list, an import of a higher layer, an import of the package root from inside the library, a
controller outside ``designed/`` (and ``peft_lora``) importing ``design/``, or the library naming the study
(``experiments``, ``paper_figs``) fails here; so does code outside ``families/`` that branches on an
architecture's name or class (the table's "nothing outside ``families/`` tests a family or class name").
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layers() -> dict[str, int]:
    """Top-level room name (``system``, ``families``, ...) -> its layer's index in ARCHITECTURE.md's table."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    table = text.split("| layer | modules | what lives there |", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    out: dict[str, int] = {}
    for i, row in enumerate(rows):
        modules = row.split("|")[2]
        for name in re.findall(r"`([A-Za-z_0-9]+)(?:\.py|/)`", modules):
            assert name not in out, f"ARCHITECTURE.md lists {name} twice"
            out[name] = i
    return out


def _module(path: Path, root: Path = ROOT) -> tuple[str, ...]:
    parts = path.relative_to(root).with_suffix("").parts
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path, root: Path = ROOT) -> list[tuple[tuple[str, ...], int]]:
    """Every import in ``path`` (module level and inside functions) as ``(dotted target, line)``; relative
    imports resolved, ``from X import a`` giving ``X.a`` (a submodule or a name of X)."""
    module = _module(path, root)
    package = module if path.name == "__init__.py" else module[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(tuple(a.name.split(".")), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else ()
            target = base + (tuple(node.module.split(".")) if node.module else ())
            found += [(target + (a.name,), node.lineno) for a in node.names]
    return found


def _library_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in (root / "controltune").rglob("*.py") if "__pycache__" not in p.parts)


def _violations(root: Path = ROOT) -> list[str]:
    """Every import of the library under ``root`` that breaks ARCHITECTURE.md's table, one line each."""
    layers = _layers()
    wrong = []
    for path in _library_files(root):
        module = _module(path, root)
        if len(module) == 1:  # the package root: the public API, above every room
            continue
        mine = layers[module[1]]
        for target, line in _imports(path, root):
            where = f"{path.relative_to(root)}:{line} imports {'.'.join(target)}"
            if target[0] in ("experiments", "paper_figs"):
                wrong.append(f"{where} (the library never names the study)")
            if target[0] != "controltune":
                continue
            if len(target) == 1 or target[1] not in layers:  # controltune itself, or a name of the root
                wrong.append(f"{where} (the package root)")
            elif layers[target[1]] > mine:
                wrong.append(f"{where} (a higher layer)")
            elif module[1] == "controllers" and target[1] == "design" and module[2:3] not in (("designed",),
                                                                                                  ("peft_lora",)):
                wrong.append(f"{where} (only controllers/designed/ and peft_lora import design/)")
    return wrong


def test_every_library_module_is_in_a_room():
    layers = _layers()
    rooms = {_module(p)[1] for p in _library_files() if len(_module(p)) > 1}
    assert rooms - set(layers) == set(), "modules ARCHITECTURE.md's table does not list"
    assert set(layers) - rooms == set(), "rooms in ARCHITECTURE.md's table with no module"


def test_imports_point_down_the_layers():
    assert _violations() == []


def test_a_wrong_import_is_caught(tmp_path):
    """The check above can fail: late imports of a higher layer, of the package root and of the study, and a
    plain controller importing design/, each in a copy of the tree's shape."""
    package = tmp_path / "controltune"
    (package / "controllers").mkdir(parents=True)
    (package / "control.py").write_text("def f():\n    from .train import train\n    from . import build\n")
    (package / "controllers" / "lora.py").write_text("from ..design import gramian\nimport experiments\n")
    (package / "controllers" / "peft_lora.py").write_text("from ..design import design_batch\n")
    wrong = _violations(tmp_path)
    assert [w.split(" (")[1] for w in wrong] == ["a higher layer)", "the package root)", "only controllers/designed/ "
                                               "and peft_lora import design/)", "the library never names the study)"]


def test_the_package_version_is_pyprojects():
    from controltune._version import __version__

    declared = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert declared and __version__ == declared.group(1)


def _names_a_family(node: ast.AST) -> bool:
    """``<...>family.name`` or ``type(x).__name__`` / ``x.__class__.__name__``: an architecture named in code."""
    if not isinstance(node, ast.Attribute):
        return False
    if node.attr == "name":
        owner = node.value
        return (isinstance(owner, ast.Name) and owner.id == "family") or (
            isinstance(owner, ast.Attribute) and owner.attr == "family")
    return node.attr == "__name__"


def _family_tests(root: Path = ROOT) -> list[str]:
    """Comparisons and isinstance checks outside ``families/`` that branch on an architecture's name or class."""
    found = []
    for path in _library_files(root):
        if _module(path, root)[1:2] == ("families",):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            operands = []
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
                cls = node.args[1] if len(node.args) > 1 else None
                names = [e for e in (cls.elts if isinstance(cls, ast.Tuple) else [cls]) if e is not None]
                if any(isinstance(n, (ast.Name, ast.Attribute)) and re.search(
                        r"(Bert|Roberta|GPT2|Llama|Gemma|Qwen|Mistral)\w*(Model|Layer|Attention|ForSequence)",
                        ast.unparse(n)) for n in names):
                    found.append(f"{path.relative_to(root)}:{node.lineno} {ast.unparse(node)}")
            if any(_names_a_family(o) for o in operands):
                found.append(f"{path.relative_to(root)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_nothing_outside_families_branches_on_an_architecture():
    assert _family_tests() == []


def test_a_branch_on_an_architecture_is_caught(tmp_path):
    package = tmp_path / "controltune"
    (package / "families").mkdir(parents=True)
    (package / "families" / "encoder.py").write_text("ok = family.name == 'bert'\n")  # its own room: allowed
    (package / "train.py").write_text("a = system.family.name == 'llama'\nb = type(m).__name__ in ('X',)\n"
                                      "c = isinstance(m, BertModel)\nd = f'{system.family.name}'\n")
    assert [line.split(" ", 1)[0] for line in _family_tests(tmp_path)] == [
        "controltune/train.py:1", "controltune/train.py:2", "controltune/train.py:3"]


def _runtime_graph(root: Path = ROOT) -> dict[tuple[str, ...], set[tuple[str, ...]]]:
    """Module -> the library modules it imports when it runs (late imports included; imports under
    ``if TYPE_CHECKING:`` left out, since annotations may point anywhere without running)."""
    files = {_module(p, root): p for p in _library_files(root)}
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        package = module if path.name == "__init__.py" else module[:-1]
        targets = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else ()
                target = base + (tuple(node.module.split(".")) if node.module else ())
                targets |= {target + (a.name,) if target + (a.name,) in files else target for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {tuple(a.name.split(".")) for a in node.names}
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def _cycles(graph: dict[tuple[str, ...], set[tuple[str, ...]]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan)."""
    index: dict = {}
    low: dict = {}
    stack: list = []
    found = []

    def visit(v: tuple[str, ...]) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(".".join(w))
            if component:
                found.append(sorted([*component, ".".join(v)]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_hides_in_a_late_import():
    assert _cycles(_runtime_graph()) == []


def test_a_late_import_cycle_is_caught(tmp_path):
    package = tmp_path / "controltune" / "bounds"
    package.mkdir(parents=True)
    (package / "enclosure.py").write_text("from . import attention_enclosure as att\n")
    (package / "attention_enclosure.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                    "    from .enclosure import Radii\n")
    assert _cycles(_runtime_graph(tmp_path)) == []  # annotations only: no cycle at run time
    (package / "attention_enclosure.py").write_text("def f():\n    from .enclosure import spectral\n")
    assert _cycles(_runtime_graph(tmp_path)) == [["controltune.bounds.attention_enclosure",
                                                  "controltune.bounds.enclosure"]]
