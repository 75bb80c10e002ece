"""Every first-party module imports, and every third-party import is declared in pyproject.toml.

The two halves catch a missing dependency in both places the suite runs. In CI's fresh virtualenv (`.ci/run`) only
what `make install` installed exists, so importing each module fails on an undeclared package even where no other
test reaches that module. On a developer's machine everything may be installed anyway, so the second half reads
the imports from the source and maps each to the distribution that provides it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Third-party modules imported but deliberately not declared, and why.
UNDECLARED_ON_PURPOSE = {
    # bench/engine.py imports it only inside the vLLM runner, which runs under the virtualenv that
    # bench/setup_vllm_cpu.sh makes; vLLM pins its own torch, so it cannot share raylane's environment.
    "vllm",
}


def first_party_packages() -> list[str]:
    """The packages the wheel ships: `[tool.setuptools.packages.find] include`, without the globs."""
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.rstrip("*").rstrip(".") for pattern in include})


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_modules() -> list[str]:
    return sorted(module_name(path) for package in first_party_packages() for path in (REPO / package).rglob("*.py"))


@pytest.mark.parametrize("name", first_party_modules())
def test_module_imports(name: str) -> None:
    # bench/ scripts only put the repository on sys.path at import time; their work sits behind `__main__` guards.
    importlib.import_module(name)


def test_every_top_level_package_ships_and_is_first_party() -> None:
    """A package folder left out of `packages.find` would import from a clone but be missing from the wheel."""
    on_disk = {path.parent.name for path in REPO.glob("*/__init__.py")}
    assert on_disk == set(first_party_packages())
    assert on_disk == set(PYPROJECT["tool"]["ruff"]["lint"]["isort"]["known-first-party"])
    assert len(first_party_modules()) > 50  # the walk found the code, not an empty tree


def normalize(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


OPTIONAL_EXTRAS = ("fuzz",)
"""Extras the README's install step does not install: their modules may be absent from the test environment."""


def distributions(requirements) -> set[str]:
    """The normalized distribution names of PEP 508 requirement strings."""
    return {normalize(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]) for requirement in requirements}


def extra_distributions(extra: str) -> set[str]:
    return distributions(PYPROJECT["project"]["optional-dependencies"][extra])


def declared_distributions() -> set[str]:
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"].values()
    return distributions([*project["dependencies"], *(r for extra in extras for r in extra)])


@cache
def installed_providers() -> dict[str, list[str]]:
    """Importable top-level module -> the installed distributions that provide it."""
    return importlib.metadata.packages_distributions()


def third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the files that import it (at any depth, including inside functions)."""
    # Test helpers sit beside the tests and import by their bare names (the test folders are not packages).
    first_party = set(first_party_packages()) | {"tests"} | {path.stem for path in (REPO / "tests").rglob("*.py")}
    found: dict[str, set[str]] = {}
    # examples/ too: a user runs those scripts against what the README's install step installed.
    files = [p for folder in [*first_party_packages(), "tests", "examples"] for p in (REPO / folder).rglob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.partition(".")[0] for name in names}:
                if top not in sys.stdlib_module_names and top not in first_party and not top.startswith("_"):
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_is_declared() -> None:
    declared = declared_distributions()
    imports = third_party_imports()
    assert {"torch", "ray", "grpc"} <= imports.keys()  # the scan sees the code's real imports
    undeclared = {}
    for module, files in sorted(imports.items()):
        if module in UNDECLARED_ON_PURPOSE:
            continue
        # Not installed: only an optional extra may provide it (the README's install step skips extras but `dev`),
        # and then the distribution is named after the module, as atheris is.
        providers = [normalize(d) for d in installed_providers().get(module, [])] or [
            normalize(module) for extra in OPTIONAL_EXTRAS if normalize(module) in extra_distributions(extra)
        ]
        if not providers or not declared.intersection(providers):
            undeclared[module] = (providers or ["not installed"], sorted(files)[:3])
    assert not undeclared, f"imported but not provided by a requirement in pyproject.toml: {undeclared}"
