"""The lock that make venv and CI install agrees with pyproject's ranges."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO


def _locked() -> dict[str, Version]:
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", (REPO / "requirements.lock").read_text(), re.M)
    return {canonicalize_name(name): Version(version) for name, version in pins}


def _extras() -> list[str]:
    makefile = (REPO / "Makefile").read_text()
    return re.search(r"^EXTRAS := (.+)$", makefile, re.M).group(1).split(",")


def test_every_requirement_is_locked_within_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in _extras():
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    locked = _locked()
    env = {"python_version": "3.11", "platform_machine": "x86_64", "sys_platform": "linux"}
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is in pyproject but not in requirements.lock: run `make lock`"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={locked[name]}, outside pyproject's {req.specifier}: run `make lock`")


def test_lock_keeps_the_scheduler_working_and_torch_on_the_cpu():
    locked = _locked()
    # SQLAlchemy 2.1 breaks prefect 3.8.8's scheduler (see pyproject.toml).
    assert locked["sqlalchemy"] < Version("2.1")
    assert locked["prefect"] == Version("3.8.8")
    assert locked["torch"].local == "cpu"
    assert not [n for n in locked if n.startswith("nvidia-c") or n == "triton"], "a CUDA build crept into the lock"
    lock_text = (REPO / "requirements.lock").read_text()
    assert all("--hash=sha256:" in block for block in re.split(r"\n(?=[A-Za-z0-9])", lock_text) if "==" in block)
