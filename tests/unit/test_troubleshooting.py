"""Each error the CLI prints is on the troubleshooting page, and the page lists every exit code the CLI uses.

The commands run in process (typer's runner) on bad input that is refused before
any flow or server starts, and each printed ``error:`` line must match a message
the page documents (``…`` stands for the variable part). A new or reworded
message fails here until the page says what it means and what to do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import EXIT_INDEX_UNAVAILABLE, app
from tests.conftest import REPO, SAMPLE_DIR

PAGE = REPO / "docs" / "troubleshooting.md"


def _documented() -> list[re.Pattern[str]]:
    """Each documented message (a table row's first cell) as a pattern: ``…`` matches anything."""
    patterns = []
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        cell = re.match(r"^\| `(.+?)` \|", line)
        if cell:
            text = cell.group(1).replace("`", "")
            patterns.append(re.compile(".*".join(re.escape(part) for part in text.split("…")), re.S))
    return patterns


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    saved = dict(os.environ)  # the CLI sets Prefect defaults in the environment: keep them out of other tests
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("EMBEDDER_")]:
        monkeypatch.delenv(name)
    yield CliRunner()
    os.environ.clear()
    os.environ.update(saved)


def _cases(tmp: Path) -> list[tuple[list[str], dict[str, str], int]]:
    (tmp / "one.json").write_text('{"a": 1}')
    (tmp / "broken.json").write_text("not json")
    (tmp / "typo.toml").write_text("[embedder]\nrrf_kk = 1\n")
    (tmp / "twice.toml").write_text("[embedder]\nrrf_k = 1\n[embedder.fuse]\nrrf_k = 2\n")
    (tmp / "settings.yaml").write_text("rrf_k: 1\n")
    (tmp / "empty").mkdir()
    (tmp / "queries.jsonl").write_text('{"_id": "q1"}\n')
    sample = ["run", "--input", str(SAMPLE_DIR), "--output-dir", "out"]
    return [
        (["run", "--input", "nope.jsonl", "--output-dir", "out"], {}, 2),
        ([*sample, "--config", "typo.toml"], {}, 2),
        ([*sample, "--config", "missing.toml"], {}, 2),
        ([*sample, "--config", "settings.yaml"], {}, 2),
        ([*sample, "--config", "twice.toml"], {}, 2),
        ([*sample, "--collection", "../escape"], {}, 2),
        ([*sample, "--fusion", "rrf"], {"EMBEDDER_RRF_K": "1", "EMBEDDER_FUSE__RRF_K": "2"}, 2),
        (sample, {"EMBEDDER_RERANK_TOP_K": "many"}, 2),
        (sample, {"EMBEDDER_RERANK__TOP_K": "0"}, 2),
        (["validate", "broken.json"], {}, 1),
        (["validate", "one.json"], {}, 1),
        (["validate", "nope.json"], {}, 1),
        (["search", "--output-dir", "empty", "--collection", "x", "--query", "hi"], {}, 1),
        (["verify", "--output-dir", "empty"], {}, 2),
        (["eval", "--beir-dir", "empty", "--split", "test", "--output-dir", "out"], {}, 2),
    ]


def test_every_error_the_cli_prints_is_documented(cli: CliRunner, tmp_path: Path):
    documented = _documented()
    assert len(documented) > 40
    for argv, env, code in _cases(tmp_path):
        result = cli.invoke(app, argv, env=env)
        assert result.exit_code == code, (argv, result.exit_code, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert errors, (argv, result.output)
        message = errors[0].removeprefix("error: ").replace("`", "")
        assert any(p.fullmatch(message) for p in documented), f"not on docs/troubleshooting.md: {message}"


def test_every_exit_code_is_in_the_table():
    text = PAGE.read_text(encoding="utf-8")
    codes = {int(c) for c in re.findall(r"^\| (\d+)(?:, \d+)? \|", text, re.M)}
    codes |= {int(c) for c in re.findall(r"^\| \d+, (\d+) \|", text, re.M)}
    assert {0, 1, 2, EXIT_INDEX_UNAVAILABLE, 130, 143} <= codes
