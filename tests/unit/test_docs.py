"""The README stays short and the documentation stays true: reference pages are what the code generates."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import REPO


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", REPO / "docs" / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", ["configuration", "cli", "summary"])
def test_reference_pages_are_what_the_code_generates(page):
    expected = getattr(_generator(), page)()
    committed = (REPO / "docs" / "reference" / f"{page}.md").read_text(encoding="utf-8")
    assert committed == expected, f"docs/reference/{page}.md is stale: run `make docs` (python docs/gen_reference.py)"


def test_every_setting_and_command_is_in_the_reference():
    from embedder.settings import SETTING_PATHS

    config = (REPO / "docs" / "reference" / "configuration.md").read_text(encoding="utf-8")
    assert all(f"| `{path}`" in config for path in SETTING_PATHS)
    cli = (REPO / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    for command in ("run", "search", "eval", "summary", "validate", "verify", "server start", "server stop"):
        assert f"## `embed-collections {command}`" in cli, command


def test_the_readme_is_short_and_starts_with_the_two_commands():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150
    first_screen = "\n".join(lines[:40])
    assert "make demo" in first_screen and "make test" in first_screen


def test_nothing_users_get_points_outside_the_repository():
    shipped = [REPO / "README.md", REPO / "CONTRIBUTING.md", *(REPO / "docs").rglob("*.md"),
               *(p for d in ("embedder", "flows", "tasks", "deployments") for p in (REPO / d).rglob("*.py"))]
    offenders = [str(p.relative_to(REPO)) for p in shipped if "../shared" in p.read_text(encoding="utf-8")]
    assert not offenders, offenders
