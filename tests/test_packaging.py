"""Packaging: every source package ships, and the README's commands are what CI runs."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> tuple[set[str], dict[str, str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(config["packages"]), config["package-dir"]


def test_every_subpackage_is_declared() -> None:
    declared, package_dir = _declared()
    found = set()
    for top, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((top, *parts)))
    # tokencompress.adapters lives in adapters/, not tokencompress/adapters/.
    assert found == declared, f"pyproject.toml packages {sorted(declared)} != on disk {sorted(found)}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "<!-- test-command -->" in readme and "<!-- main-command -->" in readme
    assert "README.md" in (ROOT / ".ci" / "run").read_text()
