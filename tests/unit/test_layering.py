"""The layering rules of the packages, checked by reading every module's imports.

- ``fogmig.platform.base`` imports nothing else of fogmig: every package may depend on it.
- ``fogmig.policies`` are pure: they import only themselves and the base layer.
- The library (everything but ``platform/apps``, ``platform/cli`` and ``experiments``) never
  imports the applications or the CLI; the applications never import the CLI.
- The containerised service imports nothing of fogmig: it runs inside its own image.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {
    "platform": "fogmig.platform",
    "services": "fogmig.services",
    "device_sim": "fogmig.device_sim",
    "policies": "fogmig.policies",
    "experiments": "fogmig.experiments",
}


def _modules() -> Iterator[tuple[str, Path]]:
    for folder, root in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([root, *parts]), path


@functools.cache
def _imports(path: Path) -> set[str]:
    """Every fogmig module named by an import anywhere in the file (also inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == "fogmig" or n.startswith("fogmig.")}


MODULES = dict(_modules())
APPS = ("fogmig.platform.apps", "fogmig.experiments")
CLI = ("fogmig.platform.cli",)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _resolve(imported: str) -> str | None:
    """The module an imported name stands for (``from m import f`` names ``m.f``)."""
    if imported in MODULES:
        return imported
    parent = imported.rsplit(".", 1)[0]
    return parent if parent in MODULES else None


def _violations(
    modules: tuple[str, ...],
    *,
    allowed: tuple[str, ...] | None = None,
    forbidden: tuple[str, ...] = (),
) -> list[str]:
    """Imports by ``modules`` of a module outside ``allowed`` or inside ``forbidden``."""
    found = set()
    for name, path in MODULES.items():
        if not _under(name, modules):
            continue
        for imported in _imports(path):
            module = _resolve(imported)
            if module is None or module == "fogmig":
                continue
            if (allowed is not None and not _under(module, allowed)) or _under(module, forbidden):
                found.add(f"{name} imports {module}")
    return sorted(found)


def test_the_modules_are_found() -> None:
    assert "fogmig.platform.base.errors" in MODULES
    assert len(MODULES) > 50


def test_base_imports_nothing_else_of_fogmig() -> None:
    assert _violations(("fogmig.platform.base",), allowed=("fogmig.platform.base",)) == []


def test_policies_are_pure() -> None:
    allowed = ("fogmig.policies", "fogmig.platform.base")
    assert _violations(("fogmig.policies",), allowed=allowed) == []


def test_the_service_imports_nothing_of_fogmig() -> None:
    assert _imports(MODULES["fogmig.services.sensor"]) == set()


@pytest.mark.parametrize(
    "package",
    [
        "fogmig.platform.base",
        "fogmig.platform.runtime",
        "fogmig.platform.transfer",
        "fogmig.platform.bus",
        "fogmig.platform.migration",
        "fogmig.platform.agent",
        "fogmig.platform.controller",
        "fogmig.platform.testbed",
        "fogmig.services",
        "fogmig.device_sim",
        "fogmig.policies",
    ],
)
def test_the_library_never_imports_applications_or_the_cli(package: str) -> None:
    assert _violations((package,), forbidden=APPS + CLI) == []


def test_applications_never_import_the_cli() -> None:
    assert _violations(APPS, forbidden=CLI) == []


def test_a_rule_break_is_detected(tmp_path: Path) -> None:
    # The checker itself must be able to fail.
    bad = tmp_path / "bad.py"
    bad.write_text("from fogmig.platform.cli.main import main\n")
    MODULES["fogmig.platform.base.bad_example"] = bad
    try:
        assert _violations(("fogmig.platform.base",), allowed=("fogmig.platform.base",)) == [
            "fogmig.platform.base.bad_example imports fogmig.platform.cli.main"
        ]
    finally:
        del MODULES["fogmig.platform.base.bad_example"]
