"""The shape of the house: a pure core that never imports Ray, no import circles, rooms of a readable size."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "galgan_ray"
SHELL = ("ray_shell", "commands")  # the Ray shell, and the CLI that may start it
MAX_LINES = 900


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Modules ``name`` imports, anywhere in the file (absolute names)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return found


def _is_core(name: str) -> bool:
    parts = name.split(".")
    return not (len(parts) > 1 and parts[1] in SHELL) and name != "galgan_ray.cli"


def test_the_core_never_imports_ray_or_the_shell():
    bad = {}
    for name, path in _modules().items():
        if not _is_core(name):
            continue
        hits = sorted(m for m in _imports(name, path)
                      if m == "ray" or m.startswith("ray.") or any(f"galgan_ray.{s}" in m for s in SHELL))
        if hits:
            bad[name] = hits
    assert not bad, f"core modules importing Ray or the shell: {bad}"


def test_no_import_circles():
    mods = _modules()
    graph = {n: {m for m in _imports(n, p) if m in mods and m != n} for n, p in mods.items()}
    # A package's __init__ re-exporting its rooms is not a circle through the package.
    for n in graph:
        graph[n] = {m for m in graph[n] if not n.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_rooms_stay_readable():
    long = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert not {n: k for n, k in long.items() if k > MAX_LINES}, f"modules over {MAX_LINES} lines"


def test_the_field_pipeline_is_a_package_whose_steps_are_written_once():
    from galgan_ray import field

    assert Path(field.__file__).name == "__init__.py"
    names = [st.name for st in field.STEPS]
    assert len(names) == len(set(names))
    for room in ("footprints", "cutouts", "children", "measure", "catalog", "truth"):
        assert (PKG / "field" / f"{room}.py").exists(), room
        assert f"field.{room}" in field.__doc__
