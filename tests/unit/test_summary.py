import copy
import json
import subprocess
import sys

import pytest

from embedder.errors import SummaryValidationError
from embedder.summary import load_summary, normalize_processing_summary, render_summary_lines, validate_summary
from tests.conftest import FIXTURES, REPO

V40 = FIXTURES / "summary_v40.json"
V41 = FIXTURES / "summary_v41.json"


def test_normalize_never_mutates_and_fills_v40_defaults():
    data = json.loads(V40.read_text())
    before = copy.deepcopy(data)
    out = normalize_processing_summary(data)
    assert data == before
    assert out is not data
    assert out["telemetry"] == {"lease_events": [], "stages": {}}
    assert out["compatibility"] == {"current": "v4.1", "legacy": ["v4.0"]}
    assert out["warnings"] == []
    out["dense_run"]["batch_size"] = -1  # a deep copy: nested edits do not leak back
    assert data["dense_run"]["batch_size"] == 128


def test_both_fixture_versions_load():
    assert load_summary(V40).schema_version == "v4.0"
    s = load_summary(V41)
    assert s.schema_version == "v4.1"
    assert s.rerank_run.payload[0].scores == [7.1, 2.3, -4.0]
    assert s.sparse_run.payload.fallback_used is True


def test_unknown_version_names_the_supported_ones():
    with pytest.raises(SummaryValidationError, match=r"'v5\.0' is not supported; supported versions: v4\.1, v4\.0"):
        validate_summary({"schema_version": "v5.0", "collection": "x", "chunk_count": 1})


def test_v41_missing_required_field():
    data = json.loads(V41.read_text())
    del data["run_id"]
    with pytest.raises(SummaryValidationError, match="missing required field\\(s\\): run_id"):
        validate_summary(data)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_cli_validate_accepts_fixtures_and_rejects_corruption(tmp_path):
    for f in (V40, V41):
        r = _cli("validate", str(f))
        assert r.returncode == 0, r.stderr
    data = json.loads(V41.read_text())
    data["rerank_run"]["payload"][0]["batch_size"] = "thirty-two"
    bad = tmp_path / "corrupt.json"
    bad.write_text(json.dumps(data))
    r = _cli("validate", str(bad))
    assert r.returncode != 0
    assert "rerank_run.payload.0.batch_size" in r.stderr


def test_cli_summary_prints_present_sections_only():
    r = _cli("summary", str(V40))
    assert r.returncode == 0
    assert "Dense: sentence-transformers/all-MiniLM-L6-v2 on cuda" in r.stdout
    assert "Rerank" not in r.stdout and "Sparse" not in r.stdout
    r = _cli("summary", str(V41))
    lines = r.stdout.splitlines()
    dense_at = next(i for i, line in enumerate(lines) if line.startswith("Dense:"))
    rerank_at = next(i for i, line in enumerate(lines) if line.startswith("Rerank:"))
    sparse_at = next(i for i, line in enumerate(lines) if line.startswith("Sparse:"))
    assert dense_at < sparse_at and dense_at < rerank_at
    assert "WARNING: sparse metadata fallback used for 1 chunk(s)" in lines


def test_render_on_a_fresh_model_has_no_optional_sections():
    s = validate_summary({"schema_version": "v4.0", "collection": "c", "chunk_count": 0})
    assert [line.split(":")[0] for line in render_summary_lines(s)] == ["Collection", "Generated"]
