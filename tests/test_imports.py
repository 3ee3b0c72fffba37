"""Imports inside exmap_ray point down: no module imports, directly or through others, one that imports it.

Every module's imports are read with `ast`, the ones inside functions included (a lazy import is still a
dependency), the ones under `if TYPE_CHECKING:` left out (they never run). `registry.require` imports
`exmap_ray.plugins` by name through importlib; that is a string, not an import statement, and is meant to
be the one way up (docs/design.md, "Import layers").

    python tests/test_imports.py     # each module's layer (0 = imports nothing of exmap_ray) and imports
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "exmap_ray"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__.py)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node.test):
            stack.extend(node.orelse)  # the else branch runs
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of the package that module `name` imports."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]  # the package relative imports start from
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            # `from P import x`: the submodule P.x where x is one, else P (x is a name P defines). P's
            # own __init__ runs first either way, but a package's __init__ importing its submodules is
            # the package being assembled, not a dependency of theirs on it.
            targets = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in known else base_name for a in node.names]
        for t in targets:
            while t and t not in known:  # trim to the longest dotted prefix that is a module of the package
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports."""
    mods = modules(root)
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # the package has ~70 modules: recursion depth is no concern
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def layers(g: dict[str, set[str]]) -> dict[str, int]:
    """Each module's layer: 0 when it imports nothing of the package, else one above its highest import."""
    layer: dict[str, int] = {}

    def of(v: str) -> int:
        if v not in layer:
            layer[v] = 0  # (only reached again through a cycle, which test_no_import_cycles reports)
            layer[v] = 1 + max((of(w) for w in g[v]), default=-1)
        return layer[v]

    for v in g:
        of(v)
    return layer


def test_the_graph_sees_lazy_imports_and_skips_type_only_ones():
    """The reader itself: a function-level import counts, an `if TYPE_CHECKING:` one does not."""
    g = graph()
    # stages.py imports erm inside _erm (a lazy import): it must be an edge
    assert f"{PACKAGE}.erm" in g[f"{PACKAGE}.stages"]
    # data/base.py imports layout only under TYPE_CHECKING (layout imports base): no edge
    assert f"{PACKAGE}.data.layout" not in g[f"{PACKAGE}.data.base"]
    assert f"{PACKAGE}.data.base" in g[f"{PACKAGE}.data.layout"]
    assert len(g) > 40  # every module was read


# Cycles known and reported, to be broken in the package code; the test fails on any other, and on a
# listed one once it is gone (so the entry goes too). retrain.base's `_end_to_end` imports finetune
# lazily, finetune's JTT objective imports jtt lazily, and jtt imports base to register itself.
KNOWN_CYCLES: list[list[str]] = []


def test_no_import_cycles():
    found = cycles(graph())
    new = [c for c in found if c not in KNOWN_CYCLES]
    assert not new, "import cycles between modules of exmap_ray (imports must point down): " + "; ".join(
        " <-> ".join(c) for c in new
    )
    gone = [c for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"no longer a cycle, remove it from KNOWN_CYCLES: {gone}"


def test_the_cycle_check_finds_the_cycles_the_house_had(tmp_path):
    """The two cycles issue 30 found at 9349db1 (store <-> storage through a lazy import, groups <->
    peers through a bottom-of-module import), rebuilt as a tiny package: both are reported."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "storage.py": "def write():\n    from .store import atomic_path\n",
        "store.py": "from .storage import write\n",
        "groups.py": "X = 1\nfrom . import peers  # noqa\n",
        "peers.py": "from .groups import X\n",
        "typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub.leaf import Y\n",
        "sub/__init__.py": "from . import leaf\n",
        "sub/leaf.py": "from ..typed import TYPE_CHECKING\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    found = cycles(graph(pkg))
    assert found == [[f"{PACKAGE}.groups", f"{PACKAGE}.peers"], [f"{PACKAGE}.storage", f"{PACKAGE}.store"]]


def test_the_bottom_layer_imports_nothing_of_the_package():
    """The modules docs/design.md names as the bottom import nothing of exmap_ray, so a plugin can declare
    its keys (options), register (registry) and raise (errors) without pulling in the rest."""
    g = graph()
    for name in ("errors", "hashing", "options", "legacy"):
        assert g[f"{PACKAGE}.{name}"] == set(), f"{name} imports {sorted(g[f'{PACKAGE}.{name}'])}"
    assert g[f"{PACKAGE}.registry"] == {f"{PACKAGE}.errors"}


if __name__ == "__main__":
    g = graph()
    lay = layers(g)
    for v in sorted(g, key=lambda m: (lay[m], m)):
        short = sorted(w.removeprefix(PACKAGE + ".") for w in g[v])
        print(f"{lay[v]:2d}  {v.removeprefix(PACKAGE + '.') or PACKAGE:28s} {', '.join(short)}")
    for c in cycles(g):
        print("CYCLE:", " <-> ".join(c))
