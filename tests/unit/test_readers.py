import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedder.errors import InputFormatError, UnsafeNameError
from embedder.io.load import load_collection
from embedder.io.readers import RecordValidator, discover_collections, read_collection, read_qrels, read_queries
from embedder.io.writers import read_chunks, read_jsonl_records
from embedder.schemas import Chunk, Reject
from tests.conftest import SAMPLE_DIR

GOOD = {"id": "g1", "text": "A perfectly good chunk.", "metadata": {"document_id": "d1"}}


def _bad_jsonl(path):
    lines = [
        json.dumps(GOOD).encode(),
        b'{"id": "m1", "text": "unterminated',                             # malformed JSON
        json.dumps({"id": "m2", "metadata": {}}).encode(),                  # missing text
        json.dumps({"id": "m3", "text": ""}).encode(),                      # empty text
        json.dumps({"id": "m4", "text": " \n\t "}).encode(),                # whitespace-only
        json.dumps({"id": "g1", "text": "duplicate of the first"}).encode(),  # duplicate id
        b'{"id": "m6", "text": "bad \xff\xfe bytes"}',                        # undecodable
        json.dumps({"id": "m7", "text": 42}).encode(),                      # wrong type: text
        json.dumps({"id": "m8", "text": "ok", "metadata": ["x"]}).encode(),  # wrong type: metadata
        json.dumps({"id": "m9", "text": "ok", "metadata": {"chunk_index": "3"}}).encode(),  # wrong metadata field
        json.dumps({"text": "no id at all"}).encode(),                      # missing id
        json.dumps({"id": "g2", "text": "x" * 50_000}).encode(),             # over-length: truncated, kept
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


EXPECTED_REASONS = {
    2: "malformed JSON", 3: "missing text", 4: "empty text", 5: "whitespace-only text", 6: "duplicate id 'g1'",
    7: "undecodable bytes", 8: "text must be a string, got int", 9: "metadata must be an object, got list",
    10: "metadata.chunk_index must be int, got str", 11: "missing id",
}


def test_jsonl_every_bad_kind_is_rejected_with_reason(tmp_path):
    items = list(read_collection(_bad_jsonl(tmp_path / "bad.jsonl"), RecordValidator(max_chunk_chars=1000)))
    chunks = [i for i in items if isinstance(i, Chunk)]
    rejects = {r.line: r for r in items if isinstance(r, Reject)}
    assert [c.id for c in chunks] == ["g1", "g2"]
    assert len(chunks[1].text) == 1000 and chunks[1].metadata["truncated_from_chars"] == 50_000
    assert set(rejects) == set(EXPECTED_REASONS)
    for line, reason in EXPECTED_REASONS.items():
        assert rejects[line].reason.startswith(reason), (line, rejects[line].reason)
        assert rejects[line].source.endswith("bad.jsonl")


def test_load_writes_rejects_and_counts(tmp_path):
    res = load_collection(_bad_jsonl(tmp_path / "bad.jsonl"), tmp_path / "chunks.parquet", tmp_path / "rejects.jsonl",
                          max_chunk_chars=1000)
    assert (res.chunk_count, res.reject_count, res.truncated_count) == (2, 10, 1)
    rows = read_jsonl_records(tmp_path / "rejects.jsonl")
    assert len(rows) == 10 and all(r["reason"] and r["source"] for r in rows)
    assert any("10 record(s) rejected" in w for w in res.warnings)
    assert any("truncated" in w for w in res.warnings)
    assert [c.id for c in read_chunks(res.chunks.path)] == ["g1", "g2"]


def test_parquet_bad_records(tmp_path):
    table = pa.table({
        "id": ["p1", "p2", "p3", "p1", "p5"],
        "text": ["good one", "", "   ", "dup", "fine too"],
        "metadata": [json.dumps({"a": 1}), None, None, None, "[1, 2]"],
    })
    path = tmp_path / "c.parquet"
    pq.write_table(table, path)
    items = list(read_collection(path))
    assert [i.id for i in items if isinstance(i, Chunk)] == ["p1"]
    reasons = [r.reason for r in items if isinstance(r, Reject)]
    assert reasons == ["empty text", "whitespace-only text", "duplicate id 'p1'",
                       "metadata must be an object, got list"]


def test_parquet_without_text_column(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"id": ["a"]}), path)
    with pytest.raises(InputFormatError, match="needs a 'text' column"):
        list(read_collection(path))


def test_rag_clean_dir_reads_chunk_ids_and_skips_summaries(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a_chunks.json").write_text(json.dumps([
        {"text": "first", "metadata": {"chunk_id": "a-0", "chunk_index": 0}},
        {"text": "second", "metadata": {"chunk_index": 1}},
    ]))
    (d / "a_processing_summary.json").write_text(json.dumps({"not": "chunks"}))
    (d / "b_chunks.json").write_bytes(b"[{\"text\": \"\xff\"}]")
    items = list(read_collection(d))
    assert [i.id for i in items if isinstance(i, Chunk)] == ["a-0", "a_chunks-1"]
    [bad] = [i for i in items if isinstance(i, Reject)]
    assert bad.source.endswith("b_chunks.json") and "undecodable" in bad.reason


def test_sample_collection_is_clean():
    items = list(read_collection(SAMPLE_DIR))
    assert len(items) == 50 and all(isinstance(i, Chunk) for i in items)


def test_discover_collections(tmp_path):
    root = tmp_path / "many"
    for name in ("alpha", "beta"):
        (root / name).mkdir(parents=True)
        (root / name / "x_chunks.json").write_text("[]")
    assert [n for n, _ in discover_collections(root)] == ["alpha", "beta"]
    assert discover_collections(SAMPLE_DIR)[0][0] == "sample_collection"
    with pytest.raises(UnsafeNameError):
        discover_collections(SAMPLE_DIR, "../escape")
    with pytest.raises(InputFormatError, match="does not exist"):
        discover_collections(tmp_path / "nope")


def test_queries_and_qrels_errors_name_the_line(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"_id": "1", "text": "fine"}\n{"_id": "2"}\n')
    with pytest.raises(InputFormatError, match=r"q\.jsonl:2: a query needs"):
        read_queries(q)
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n1\td1\tx\n")
    with pytest.raises(InputFormatError, match=r"qrels\.tsv:2"):
        read_qrels(qrels)


@pytest.mark.slow
def test_jsonl_reader_streams_200k_lines_in_bounded_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    line = {"text": "streaming keeps memory flat " * 8, "metadata": {"document_id": "d"}}
    with open(path, "w") as fh:
        for i in range(200_000):
            fh.write(json.dumps({"id": f"id-{i}", **line}) + "\n")
    size_mb = path.stat().st_size / 1e6
    tracemalloc.start()
    count = 0
    for item in read_collection(path):
        count += isinstance(item, Chunk)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 200_000
    # The file is ~50 MB; the id digests for duplicate detection cost ~100 bytes each.
    assert peak < 40e6, f"peak {peak / 1e6:.1f} MB for a {size_mb:.0f} MB file"
