"""The shape of the code base: imports run one way, rules live in I/O-free modules, modules stay small.

Layers, lowest first: wire < state-only modules of the services < services < nodes < flint. A module may import
from its own layer or below, never above; a service reaches another service only through that service's client
(or its shared package helpers). A state-only module imports only the standard library, wire, and state-only
modules of its own package: no sockets, threads, clocks or other services.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("frontend", "counting", "manager", "placement", "worker", "registry")
PACKAGES = ("wire", *SERVICES, "nodes", "flint")
# the modules that hold a service's rules: plain objects, time passed in
STATE_ONLY = {
    "frontend.state", "frontend.credits", "manager.state", "manager.health", "counting.state", "placement.state",
    "registry.state", "registry.events", "registry.code", "worker.state", "worker.netplan",
    "worker.replies",
}
# what one service may import of another
SHARED = {"client", "package"}
DECLARATIVE = {"wire.messages"}  # one small type per message: long by nature
MAX_LINES = 400


def layer(module: str) -> int:
    top = module.split(".")[0]
    if top == "wire":
        return 0
    if module in STATE_ONLY:
        return 1
    if top in SERVICES:
        return 2
    return {"nodes": 3, "flint": 4}[top]


def flint_modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(path: Path) -> set[str]:
    """Every module this file imports (at any depth of the file: lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The Flint module an import names (`from x import y` may name a module x.y or a thing in x)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def edges(root: Path = ROOT) -> list[tuple[str, str]]:
    modules = flint_modules(root)
    out = set()
    for name, path in modules.items():
        for imported in imports(path):
            target = resolve(imported, modules)
            if target is not None and target != name:
                out.add((name, target))
    return sorted(out)


def upward(root: Path = ROOT) -> list[str]:
    return [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})" for a, b in edges(root) if layer(b) > layer(a)]


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    found = upward()
    assert not found, "\n".join(found)


def test_a_service_reaches_another_only_through_its_client():
    breaches = []
    for a, b in edges():
        pa, pb = a.split(".")[0], b.split(".")[0]
        if pa in SERVICES and pb in SERVICES and pa != pb and b.split(".")[-1] not in SHARED:
            breaches.append(f"{a} imports {b}")
    assert not breaches, "\n".join(breaches)


def test_state_only_modules_import_only_the_standard_library_wire_and_their_own_rules():
    modules = flint_modules()
    breaches = []
    for name in sorted(STATE_ONLY):
        package = name.split(".")[0]
        for imported in imports(modules[name]):
            top = imported.split(".")[0]
            target = resolve(imported, modules)
            if target is not None:
                if top == "wire" or (target in STATE_ONLY and target.split(".")[0] == package):
                    continue
                breaches.append(f"{name} imports {target}")
            elif top not in sys.stdlib_module_names:
                breaches.append(f"{name} imports {imported} (not the standard library)")
    assert not breaches, "\n".join(breaches)


def test_no_module_is_longer_than_a_reader_can_hold():
    long = []
    for name, path in flint_modules().items():
        lines = path.read_text().count("\n")
        if lines > MAX_LINES and name not in DECLARATIVE:
            long.append(f"{name}: {lines} lines")
    assert not long, "\n".join(long)


def test_the_walk_finds_an_upward_import_even_a_lazy_one(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "frontend" / "service.py").write_text("from wire.codec import pack\n")
    (tmp_path / "counting" / "state.py").write_text("def f():\n    from counting import service\n")
    (tmp_path / "counting" / "service.py").write_text("")
    (tmp_path / "wire" / "codec.py").write_text("def g():\n    from frontend.service import FrontendService\n")
    assert upward(tmp_path) == ["counting.state (layer 1) imports counting.service (layer 2)",
                                "wire.codec (layer 0) imports frontend.service (layer 2)"]
