"""The package's layers (docs/design.md, "Where things are"): no import circle between modules, and no import up a
layer, counting imports inside functions and under TYPE_CHECKING too. Read from the source, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "helios"
# Each module may import its own subpackage and the layers of a lower rank. cli/ and bench/ share a rank: neither
# imports the other. The package itself (helios/__init__, __main__) is the public surface over all of them.
RANKS = {"model": 0, "sampling": 1, "scale": 2, "pipeline": 3, "serve": 4, "cli": 5, "bench": 5, "": 6}
# Imports up a layer that are there on purpose, each with the reason its code comment gives.
UPWARD = {
    ("helios.model.transformer", "helios.scale.loading"):
        "from_pretrained(offload=, quantize=) is the familiar entry point; the scale layer does the work",
}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["helios", *path.relative_to(PACKAGE).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The helios modules `name` imports anywhere in its file (a `from pkg import mod` counts as mod)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in known else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANKS) else ""


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_layer():
    assert {layer(m) for m in modules()} <= set(RANKS), sorted({layer(m) for m in modules()} - set(RANKS))
    top = sorted(m for m in modules() if layer(m) == "")
    assert top == ["helios", "helios.__main__"], f"modules outside the layers: {top}"


def test_no_import_circles():
    assert circles(graph()) == []


def test_no_import_goes_up_a_layer():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            mine, theirs = layer(module), layer(target)
            if mine != theirs and RANKS[theirs] >= RANKS[mine] and (module, target) not in UPWARD:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_the_allowed_upward_imports_exist_and_say_why():
    edges = graph()
    for (module, target), why in UPWARD.items():
        assert target in edges[module], f"{module} no longer imports {target}: drop it from UPWARD"
        assert "up a layer" in modules()[module].read_text(), f"{module}: the import up a layer has no comment"


def test_the_checks_catch_a_circle_and_an_upward_import():
    edges = {"helios.model.a": {"helios.pipeline.b"}, "helios.pipeline.b": {"helios.model.a"}}
    assert circles(edges) == [["helios.model.a", "helios.pipeline.b"]]
    assert RANKS[layer("helios.pipeline.b")] > RANKS[layer("helios.model.a")]


def test_each_layer_says_what_it_is_and_what_it_may_import():
    for name in RANKS:
        if name:
            doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
            assert "import" in doc, f"helios/{name}/__init__.py: say what the layer may import"
