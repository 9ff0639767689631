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


def _oldest_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_the_oldest_end_pins_every_declared_floor() -> None:
    """.ci/oldest.txt tests the floors that pyproject.toml declares, not older or newer ones."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(req for extra in ("recipe", "viz", "test", "eval")
                                           for req in project["optional-dependencies"][extra])]
    pins = _oldest_pins()
    for text in declared:
        requirement = Requirement(text)
        floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert floors, f"{text}: every dependency needs a floor (>=) for the oldest end to test"
        name = requirement.name.lower()
        assert name in pins, f".ci/oldest.txt does not pin {name} (pyproject: {text})"
        assert Version(pins[name]) == Version(floors[0]), f"{name}: oldest.txt pins {pins[name]}, pyproject says {text}"


def test_ci_runs_both_ends_of_the_range() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "else ends=(newest oldest); fi" in script  # both by default
    assert 'export PIP_CONSTRAINT="$repo/.ci/oldest.txt"' in script
