"""The package layout keeps its rules: no import circle, nothing imports upward, the core never imports the
experiments wing, and no file uses a private member defined in another file (docs/design.md section 2)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"libnet_plugin": ROOT / "libnet_plugin", "libnet_captum": ROOT / "adapters" / "libnet_captum",
            "libnet_onnx": ROOT / "adapters" / "libnet_onnx"}


def _modules() -> dict[str, Path]:
    out = {}
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(module: str, path: Path) -> set[str]:
    """Project modules ``module`` imports (anywhere in the file, except under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for n in ast.walk(node)}
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            subs = [f"{target}.{a.name}" for a in node.names]
            found.update(s for s in subs if s in MODULES)
            if any(s not in MODULES for s in subs) and target in MODULES:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
    found.discard(module)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_no_import_circle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_nothing_imports_upward():
    """No module imports a package that contains it (``from . import x`` inside ``__init__`` excepted)."""
    upward = [(m, n) for m, deps in GRAPH.items() for n in deps
              if m.startswith(n + ".") and MODULES[n].name == "__init__.py"]
    assert not upward, upward


def test_the_core_never_imports_the_experiments_wing_or_an_adapter():
    core = [m for m in GRAPH if m.startswith("libnet_plugin") and not m.startswith("libnet_plugin.experiments")]
    bad = [(m, n) for m in core for n in GRAPH[m]
           if n.startswith("libnet_plugin.experiments") or not n.startswith("libnet_plugin")]
    assert not bad, bad


def _private_definitions() -> dict[str, set[Path]]:
    """``_name`` -> files defining it (functions, classes, methods, module and class attributes)."""
    out: dict[str, set[Path]] = {}
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.attr if isinstance(t, ast.Attribute) else getattr(t, "id", "") for t in node.targets]
            elif isinstance(node, ast.AnnAssign):
                t = node.target
                names = [t.attr if isinstance(t, ast.Attribute) else getattr(t, "id", "")]
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    out.setdefault(n, set()).add(path)
    return out


def test_no_file_uses_a_private_member_defined_in_another_file():
    """``obj._name`` on anything but ``self``/``cls``, or ``from x import _name``, only where ``_name`` is defined."""
    private = _private_definitions()
    uses = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in private and path not in private[node.attr]:
                owner = node.value
                if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                    uses.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if a.name in private and path not in private[a.name]:
                        uses.append(f"{path.relative_to(ROOT)}:{node.lineno} import {a.name}")
    assert not uses, "\n".join(uses)
