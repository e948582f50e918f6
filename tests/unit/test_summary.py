import copy
import json
import subprocess
import sys

import pytest

from embedder.errors import SummaryValidationError
from embedder.summary import (
    load_summary,
    normalize_processing_summary,
    render_summary_lines,
    summary_notes,
    validate_strict,
    validate_summary,
    write_summary,
)
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


def test_an_unknown_major_is_an_error_and_an_unknown_minor_is_read_with_a_note():
    with pytest.raises(SummaryValidationError, match=r"'v5\.0' is a major version this reader does not know"):
        validate_summary({"schema_version": "v5.0", "collection": "x", "chunk_count": 1})
    with pytest.raises(SummaryValidationError, match=r"'4\.1' is not a version"):
        validate_summary({"schema_version": "4.1", "collection": "x", "chunk_count": 1})
    newer = json.loads(V41.read_text()) | {"schema_version": "v4.7", "a_field_from_the_future": {"x": 1}}
    s = validate_summary(newer)
    assert s.model_extra["a_field_from_the_future"] == {"x": 1}  # kept, not dropped
    assert any("newer than this reader" in n for n in summary_notes(s))


def test_reading_is_lenient_and_writing_is_strict(tmp_path):
    data = json.loads(V41.read_text())
    del data["run_id"]
    assert validate_summary(data).run_id is None  # older writers had none
    with pytest.raises(SummaryValidationError, match="missing contract key\\(s\\): run_id"):
        validate_strict(data)
    misspelt = json.loads(V41.read_text())
    misspelt["dense_run"]["modle_name"] = misspelt["dense_run"]["model_name"]
    assert validate_summary(misspelt).dense_run.model_extra == {"modle_name": "all-minilm-l6-v2"}
    with pytest.raises(SummaryValidationError, match="unknown key\\(s\\) \\(misspelt\\?\\): dense_run.modle_name"):
        validate_strict(misspelt)
    with pytest.raises(SummaryValidationError, match="unknown key"):
        write_summary(validate_summary(misspelt), tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()  # nothing half-written
    thin = json.loads(V41.read_text())
    thin["rerank_run"]["payload"][0].pop("batch_size")
    validate_summary(thin)
    with pytest.raises(SummaryValidationError, match="rerank_run.payload\\[0\\].batch_size"):
        validate_strict(thin)
    validate_strict(json.loads(V41.read_text()))


ORIGIN = REPO.parent / "shared" / "fixtures" / "origin-summaries"


@pytest.mark.parametrize("name", ["full_v41.json", "minimal_v41.json"])
def test_summaries_of_the_earlier_pipeline_validate_and_normalise(name):
    raw = json.loads((ORIGIN / name).read_text())
    s = validate_summary(raw)
    assert s.run_id is None and s.dense_run.model_name == "all-MiniLM-L6-v2"
    assert s.feature_toggles.sources == raw["feature_toggles"]["provenance"]
    assert s.performance_baseline.gpu.model_extra["peak_device"]  # their extra fields are kept
    if name == "full_v41.json":
        [payload] = s.rerank_run.payload  # one object there, a list here
        assert payload.run_id == "handbook-rerank-0001" and payload.scores == [0.91, 0.52, 0.33]
        assert s.rerank_run.top_k_candidates == 40 and s.rerank_run.device == "cuda:0"
        assert s.sparse_run.status is None and s.sparse_run.vectors.available == 11
        assert s.dense_run.model_extra["latency_seconds"]["p95"] == 0.77
    else:
        assert s.rerank_run is None and s.sparse_run is None and summary_notes(s) == []


@pytest.mark.live
def test_a_v40_of_the_earlier_pipeline_validates(tmp_path):
    raw = json.loads((ORIGIN / "full_v41.json").read_text())
    for key in ("feature_toggles", "rerank_run", "sparse_run", "compatibility", "telemetry"):
        raw.pop(key)
    path = tmp_path / "v40.json"
    path.write_text(json.dumps(raw | {"schema_version": "v4.0"}))
    for command in ("validate", "summary"):
        r = _cli(command, str(path))
        assert r.returncode == 0, r.stderr
    assert "Dense: all-MiniLM-L6-v2 on cuda:0" in r.stdout


@pytest.mark.live
def test_summary_warns_softly_when_a_toggle_is_on_but_its_section_is_missing(tmp_path):
    raw = json.loads((ORIGIN / "full_v41.json").read_text())
    del raw["rerank_run"]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(raw))
    r = _cli("summary", str(path))
    assert r.returncode == 0, r.stderr
    assert "NOTE: rerank is enabled (feature_toggles.enable_rerank) but the summary has no rerank_run section" \
        in r.stdout.splitlines()
    assert "Dense:" in r.stdout and "Sparse:" in r.stdout


@pytest.mark.live
def test_corrupt_summaries_are_rejected_naming_the_field(tmp_path):
    raw = json.loads((ORIGIN / "full_v41.json").read_text())
    cases = {"chunk_count": ("many", "chunk_count"), "dense_run": ({"device": "cpu"}, "dense_run.model_name")}
    for key, (value, named) in cases.items():
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps(raw | {key: value}))
        r = _cli("validate", str(path))
        assert r.returncode != 0 and named in r.stderr, (key, r.stderr)
    (tmp_path / "trunc.json").write_text(json.dumps(raw)[:200])
    r = _cli("validate", str(tmp_path / "trunc.json"))
    assert r.returncode != 0 and "not valid JSON" in r.stderr
    # An error is one line, whatever the path's length, and a "[" in a path is text, not markup.
    deep = tmp_path / ("d" * 120) / "night[2].json"
    deep.parent.mkdir()
    deep.write_text(json.dumps(raw)[:200])
    r = _cli("validate", str(deep))
    [line] = r.stderr.splitlines()
    assert r.returncode != 0 and line.startswith(f"error: {deep}: not valid JSON"), r.stderr


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=REPO)


@pytest.mark.live
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
    r = _cli("validate", "--strict", str(V41))
    assert r.returncode == 0 and "valid (strict)" in r.stdout, r.stderr
    r = _cli("validate", "--strict", str(V40))
    assert r.returncode != 0 and "strict: schema_version must be 'v4.1'" in r.stderr


@pytest.mark.live
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
