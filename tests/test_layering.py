"""The design rules that keep the write port one seam (issue: one write port), checked on
the source: protocol and delivery code never probes a collaborator for what it can do,
storage imports nothing from the rooms above it, and one function wires every process."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lightmail"


def _modules(*rooms: str) -> list[Path]:
    return sorted(path for room in rooms for path in (PACKAGE / room).rglob("*.py"))


def _target(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_target(node.value)}.{node.attr}"
    return type(node).__name__


def test_protocols_and_delivery_never_probe_a_collaborator() -> None:
    """hasattr/getattr only on the object itself (command dispatch) or its transport
    (TCP_NODELAY where there is TCP): never on a store, agent, writer or services."""
    probes = []
    for path in _modules("smtp", "lmtp", "imap", "pop3", "delivery"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("hasattr", "getattr") and node.args):
                target = _target(node.args[0])
                if target not in ("self", "self.transport"):
                    probes.append(f"{path.relative_to(PACKAGE)}:{node.lineno} "
                                  f"{node.func.id}({target}, ...)")
    assert probes == []


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at the top or inside a function."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def test_storage_imports_nothing_from_the_floors_above() -> None:
    above = ("lightmail.delivery", "lightmail.directory", "lightmail.smtp",
             "lightmail.lmtp", "lightmail.imap", "lightmail.pop3", "lightmail.queue",
             "lightmail.outbound", "lightmail.workers", "lightmail.admin",
             "lightmail.service", "lightmail.wiring")
    found = [f"{path.relative_to(PACKAGE)} imports {name}"
             for path in _modules("storage") for name in _imports(path)
             if name.startswith(above)]
    assert found == []


def _calls(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {_target(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}


def test_one_wiring_function_builds_every_process() -> None:
    """The main process (makeService), the workers and the lightmail command all call
    lightmail.wiring.wire, the writer process its storage part (wire_writer); nobody
    else builds the storage service, the directory, the portal or the delivery
    agent."""
    builders = {"StorageService", "SQLDirectory", "LocalDeliveryAgent", "make_portal"}
    callers, builds = set(), {}
    for path in PACKAGE.rglob("*.py"):
        name = str(path.relative_to(PACKAGE))
        calls = _calls(path)
        if calls & {"wire", "wire_writer"}:
            callers.add(name)
        if calls & builders:
            builds[name] = sorted(calls & builders)
    assert callers == {"service.py", "workers/worker.py", "workers/writer.py",
                       "admin/cli.py", "admin/datatools.py"}  # the command's data tools
    assert set(builds) == {"wiring.py"}, builds
