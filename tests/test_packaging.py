"""constraints/min.txt, which `make test-min` installs, pins every dependency at pyproject.toml's lower bound."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_constraints_of_make_test_min_are_the_declared_lower_bounds():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    bounds = {}
    for requirement in project["dependencies"]:
        name, bound = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()
        bounds[_canonical(name)] = bound
    pins = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9.]+)", line).groups()
                for line in (REPO / "constraints" / "min.txt").read_text().splitlines() if line and not line.startswith("#"))
    pins = {_canonical(name): Version(version) for name, version in pins.items()}
    bounds.pop("torch")  # installed from TORCH_SPEC, the CPU wheel's own index
    assert {name: pins.get(name) for name in bounds} == {name: Version(bound) for name, bound in bounds.items()}
