"""Packaging facts the set-up relies on."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# conda package names that differ from their PyPI names
CONDA_TO_PYPI = {"pytorch": "torch"}


def _name(requirement: str) -> str:
    name = re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def test_environment_yml_names_the_same_packages_as_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pyproject = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        pyproject |= {_name(r) for r in extra}

    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda: set[str] = set()
    for item in environment["dependencies"]:
        if isinstance(item, dict):
            conda |= {_name(r) for r in item.get("pip", [])}
        else:
            name = _name(item)
            if name not in ("python", "pip"):
                conda.add(CONDA_TO_PYPI.get(name, name))
    assert conda == pyproject, f"only in environment.yml: {conda - pyproject}; only in pyproject: {pyproject - conda}"


def test_torch_is_only_bounded_below() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_requirement = next(r for r in project["dependencies"] if _name(r) == "torch")
    assert re.fullmatch(r"torch>=[\d.]+", torch_requirement.replace(" ", ""))


def test_cpu_constraint_pins_the_local_torch_wheel() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "constraints" / "cpu.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "torch==2.13.0" in lines
