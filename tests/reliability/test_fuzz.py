"""Property tests: readers and summary normalisation never crash unhandled and never mutate input."""

from __future__ import annotations

import copy
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedder.errors import EmbedderError
from embedder.io.readers import RecordValidator, read_collection
from embedder.schemas import Chunk, Reject
from embedder.summary import normalize_processing_summary, validate_summary

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)

record_like = st.fixed_dictionaries(
    {}, optional={"id": json_values, "text": json_values | st.text(max_size=50), "metadata": json_values},
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.binary(max_size=80) | record_like.map(lambda r: json.dumps(r).encode()), max_size=12))
def test_jsonl_reader_accounts_for_every_line(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "in.jsonl"
    cleaned = [ln.replace(b"\n", b" ").replace(b"\r", b" ") for ln in lines]
    path.write_bytes(b"\n".join(cleaned) + b"\n")
    items = list(read_collection(path, RecordValidator(max_chunk_chars=64)))
    assert all(isinstance(i, (Chunk, Reject)) for i in items)
    non_blank = [ln for ln in path.read_bytes().split(b"\n") if ln.strip()]
    # Every non-blank physical line yields exactly one item: a chunk or a reject with a reason.
    assert len(items) == len(non_blank)
    assert all(r.reason for r in items if isinstance(r, Reject))
    assert all(c.text.strip() and len(c.text) <= 64 for c in items if isinstance(c, Chunk))


@settings(max_examples=300, deadline=None)
@given(data=st.dictionaries(st.sampled_from(["schema_version", "collection", "chunk_count", "run_id", "dense_run",
                                             "telemetry", "warnings", "compatibility", "rerank_run", "x"]),
                            json_values | st.sampled_from(["v4.0", "v4.1"]), max_size=8))
def test_summary_normalisation_is_total_and_pure(data):
    before = copy.deepcopy(data)
    try:
        out = normalize_processing_summary(data)
        assert isinstance(out, dict) and {"telemetry", "compatibility", "warnings"} <= set(out)
        validate_summary(data)
    except EmbedderError as exc:
        assert str(exc)
    assert data == before


@given(data=json_values)
def test_summary_rejects_non_objects_clearly(data):
    if isinstance(data, dict):
        return
    try:
        normalize_processing_summary(data)  # type: ignore[arg-type]
    except EmbedderError as exc:
        assert "must be a JSON object" in str(exc)
    else:
        raise AssertionError("a non-object was accepted")
