"""Re-runs as users run them: another output dir, deleted and edited chunks, another model, a failed index.

Each test is a sequence of real flow runs (Prefect test harness, real models,
Qdrant Edge) and asserts on what the runs leave behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedder.errors import EmbedderError, VectorIndexError
from embedder.io.edge_store import EdgeStore
from embedder.settings import CollectionInput, RunConfig
from tests.conftest import SAMPLE_DIR, SAMPLE_QRELS, SAMPLE_QUERIES

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _sample_records() -> list[dict]:
    from embedder.io.readers import RecordValidator, read_collection
    from embedder.schemas import Chunk

    return [{"id": c.id, "text": c.text, "metadata": c.metadata}
            for c in read_collection(SAMPLE_DIR, RecordValidator()) if isinstance(c, Chunk)]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _config(input_path: Path, out: Path, **updates) -> RunConfig:
    return RunConfig(collections=[CollectionInput(name="docs", path=str(input_path))], queries_path=str(SAMPLE_QUERIES),
                     output_dir=str(out), local_files_only=True, rerank={"enabled": False}).model_copy(update=updates)


def _run(cfg: RunConfig):
    from flows.embed_collections import embed_collections

    [summary] = embed_collections(cfg)
    return summary


def test_runs_into_a_b_b_then_rm_a_then_b_never_touch_a(tmp_path):
    src = _write_jsonl(tmp_path / "docs.jsonl", _sample_records())
    a, b = tmp_path / "A", tmp_path / "B"
    for out in (a, b, b):
        assert _run(_config(src, out)).status == "completed"
    shutil.rmtree(a)
    s = _run(_config(src, b))
    assert s.status == "completed" and s.index_run.points_count == 50
    assert s.telemetry.stages["dense"]["cached"]  # B's own cache, untouched by A's removal
    for f in b.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl"):
            assert str(a) not in f.read_text(errors="replace"), f
    assert all(str(a) not in str(v) for v in s.exports.values())


def test_deleted_edited_and_added_chunks_leave_exactly_the_current_points(tmp_path):
    from embedder.service import SearchRequest, search_collection

    records = _sample_records()
    src = _write_jsonl(tmp_path / "docs.jsonl", records)
    out = tmp_path / "out"
    first = _run(_config(src, out))
    assert (first.index_run.action, first.index_run.points_count) == ("rebuilt", 50)
    exported = {r["id"]: r["sparse_vector"] for r in map(json.loads, (out / "docs" / "sparse.jsonl").open())}

    deleted = {r["id"] for r in records[5:15]}
    edited = records[0] | {"text": records[0]["text"] + " Edited: the kettle whistles at dawn."}
    added = [{"id": f"new-{i}", "text": f"A new note about lighthouse keepers number {i}.", "metadata": {}}
             for i in range(5)]
    kept = [edited] + [r for r in records[1:] if r["id"] not in deleted] + added
    _write_jsonl(src, kept)
    second = _run(_config(src, out))
    ir = second.index_run
    assert second.status == "completed" and second.chunk_count == 45
    assert (ir.action, ir.upserted, ir.deleted, ir.unchanged, ir.points_count) == (
        "incremental", 6, 10, 39, 45)
    assert (second.dense_run.total_embeddings_generated, second.dense_run.reused) == (6, 39)
    assert (second.sparse_run.computed, second.sparse_run.reused) == ({"qdrant-bm25": 6}, {"qdrant-bm25": 39})
    # A reused vector is the very vector the first run computed and exported, to the last bit.
    again = {r["id"]: r["sparse_vector"] for r in map(json.loads, (out / "docs" / "sparse.jsonl").open())}
    unchanged = [r["id"] for r in kept[1:-5]]
    assert len(unchanged) == 39 and all(again[i] == exported[i] for i in unchanged)
    assert EdgeStore(out).status("docs").points_count == 45
    hits = set()
    for r in records[5:15]:
        resp = search_collection(out, SearchRequest(collection="docs", query=r["text"][:200], top_k=10, rerank=False))
        hits |= {h.id for h in resp.hits}
    assert hits and not hits & deleted

    third = _run(_config(src, out))
    assert (third.index_run.action, third.index_run.upserted, third.index_run.deleted) == ("unchanged", 0, 0)


@pytest.mark.slow
def test_a_small_edit_to_a_real_collection_embeds_and_indexes_only_what_changed(tmp_path):
    """SciFact abstracts: edit one, delete ten, add five; the re-run computes 6 vectors and keeps the rest.

    What the edit costs against the first run is a measurement: ``bench/peers.py`` reports it."""
    from tests.conftest import SCIFACT

    docs = []
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            docs.append({"id": rec["_id"], "text": f"{rec['title']} {rec['text']}".strip(), "metadata": {}})
            if len(docs) == 65:
                break
    first_docs, extra = docs[:60], docs[60:]
    src = _write_jsonl(tmp_path / "scifact.jsonl", first_docs)
    out = tmp_path / "out"
    first = _run(_config(src, out))
    assert first.dense_run.total_embeddings_generated == 60
    edited = [first_docs[0] | {"text": first_docs[0]["text"] + " (revised)"}] + first_docs[1:50] + extra[:5]
    _write_jsonl(src, edited)
    second = _run(_config(src, out))
    assert (second.dense_run.total_embeddings_generated, second.dense_run.reused) == (6, 49)
    assert (second.sparse_run.computed, second.sparse_run.reused) == ({"qdrant-bm25": 6}, {"qdrant-bm25": 49})
    assert second.index_run.points_count == second.chunk_count == 55
    assert (second.index_run.upserted, second.index_run.deleted) == (6, 10)


def test_a_model_change_builds_a_new_index_and_a_failed_switch_leaves_the_old_set(tmp_path, tiny_dense_model,
                                                                                   monkeypatch):
    from embedder.io import edge_store
    from embedder.service import SearchRequest, search_collection

    src = _write_jsonl(tmp_path / "docs.jsonl", _sample_records())
    out = tmp_path / "out"
    first = _run(_config(src, out))
    cdir = out / "docs"
    published = {n: (cdir / n).read_bytes() for n in ("processing_summary.json", "dense.parquet", "qdrant.jsonl")}
    build = EdgeStore(out).status("docs").build_id

    def broken_publish(self):
        raise VectorIndexError("injected: the disk filled up while publishing")

    monkeypatch.setattr(edge_store.EdgeIndexWriter, "publish", broken_publish)
    with pytest.raises(EmbedderError, match="index"):
        _run(_config(src, out, dense_model=str(tiny_dense_model)))
    # The failed run's summary is published, beside the old exports and the old index, and says so.
    del published["processing_summary.json"]
    assert {n: (cdir / n).read_bytes() for n in published} == published
    assert EdgeStore(out).status("docs").build_id == build
    failed = json.loads((cdir / "processing_summary.json").read_text())
    assert failed["status"] == "failed" and failed["failed_stage"] == "index"
    assert any("index stage failed" in w for w in failed["warnings"])
    assert failed["exports_run_id"] == str(first.run_id) and failed["run_id"] != str(first.run_id)
    assert all(Path(p).parent == (cdir / "current").resolve() for p in failed["exports"].values())
    old = search_collection(out, SearchRequest(collection="docs", query="sourdough", top_k=3, rerank=False))
    assert old.hits and first.dense_run.model_name == "all-minilm-l6-v2"

    monkeypatch.undo()
    changed = _run(_config(src, out, dense_model=str(tiny_dense_model)))
    assert changed.status == "completed" and changed.index_run.action == "rebuilt"
    status = EdgeStore(out).status("docs")
    assert status.layout.dense_dim == 64 and status.points_count == 50
    resp = search_collection(out, SearchRequest(collection="docs", query="sourdough", top_k=3, rerank=False))
    assert len(resp.hits) == 3
    dense = np.asarray(__import__("pyarrow.parquet", fromlist=["x"]).read_table(cdir / "dense.parquet")["vector"]
                       .to_pylist())
    assert dense.shape == (50, 64)


def test_a_deterministic_index_error_is_not_retried(tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from embedder.errors import IndexLayoutError
    from embedder.io import edge_store

    def wrong_layout(self, *a, **k):
        raise IndexLayoutError("injected: the collection holds another layout")

    monkeypatch.setattr(edge_store.EdgeStore, "writer", wrong_layout)
    src = _write_jsonl(tmp_path / "docs.jsonl", _sample_records())
    with pytest.raises(EmbedderError):
        _run(_config(src, tmp_path / "out"))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="qdrant-index")),
                                     limit=50)
    latest = max(runs, key=lambda r: r.expected_start_time)
    assert latest.run_count == 1 and latest.state.is_failed()


def test_each_run_publishes_one_whole_set_and_old_sets_are_pruned(tmp_path):
    import os

    records = _sample_records()
    src = _write_jsonl(tmp_path / "docs.jsonl", records)
    out = tmp_path / "out"
    cdir = out / "docs"
    sets = []
    for i in range(3):
        _write_jsonl(src, records[: 40 + i])  # each run changes the collection
        s = _run(_config(src, out))
        current = (cdir / "current").resolve()
        sets.append(current.name)
        # Every stable name resolves into the one published set, and the summary names exactly those files.
        for name in ("processing_summary.json", "dense.parquet", "sparse.jsonl", "qdrant.jsonl", "index.json"):
            assert (cdir / name).is_symlink() and (cdir / name).resolve().parent == current, name
        assert all(Path(p).parent == current for k, p in s.exports.items() if k != "chunks")
        index = json.loads((cdir / "index.json").read_text())
        assert index["points_count"] == s.chunk_count == 40 + i
        assert EdgeStore(out).status("docs").build_id == index["shard"]
    assert len(set(sets)) == 3
    left = sorted(os.listdir(cdir / "runs"))
    assert left == sorted(sets[1:])  # the published set and the one before it
    assert len(list((cdir / "index" / "shards").iterdir())) == 2
    # An unchanged night: its exports equal the published set's and share their bytes on disk.
    before = (cdir / "current").resolve()
    _run(_config(src, out))
    after = (cdir / "current").resolve()
    assert after != before
    for name in ("sparse.jsonl", "qdrant.jsonl"):
        assert os.path.samefile(after / name, before / name), name


def test_the_stage_store_keeps_what_retained_runs_used_and_a_reverted_input_still_runs(tmp_path):
    """Inputs A, B, C, then A again: stage results only C and B used are kept; A's were pruned, and the
    Prefect cache records that named them are recomputed rather than served."""
    records = _sample_records()
    src = tmp_path / "docs.jsonl"
    out = tmp_path / "out"
    stages = out / "docs" / ".stages"
    versions = {"A": records[:44], "B": records[:46], "C": records[:48]}
    used: dict[str, set[str]] = {}
    for name in ("A", "B", "C"):
        before = {p.name for p in (stages / "dense").iterdir()} if (stages / "dense").is_dir() else set()
        _write_jsonl(src, versions[name])
        assert _run(_config(src, out)).status == "completed"
        used[name] = {p.name for p in (stages / "dense").iterdir()} - before
        assert len(used[name]) == 1
    # After C: the published set (C) and the one before it (B) are retained, so A's results went.
    assert {p.name for p in (stages / "dense").iterdir()} == used["B"] | used["C"]
    assert all((stages / "dense" / k / "result.json").is_file() for k in used["B"] | used["C"])

    _write_jsonl(src, versions["A"])
    again = _run(_config(src, out))
    assert again.status == "completed" and again.index_run.points_count == 44
    assert not again.telemetry.stages["dense"]["cached"]  # its record named pruned files: recomputed
    assert again.dense_run.total_embeddings_generated == 0 and again.dense_run.reused == 44  # per-chunk reuse
    assert (stages / "dense" / next(iter(used["A"])) / "result.json").is_file()
    # Every published file is a whole file of its own set: the store's pruning never reaches it.
    current = (out / "docs" / "current").resolve()
    assert json.loads((current / "processing_summary.json").read_text())["chunk_count"] == 44
    assert all(Path(p).parent == current for p in again.exports.values())


def test_vector_spaces_no_run_used_for_the_retention_period_go_and_cached_runs_keep_theirs(tmp_path,
                                                                                           tiny_dense_model):
    """MiniLM, then another model; a month passes; the other model's nightly run is served from cache and
    keeps its vectors, MiniLM's (used by no retained run) go, and switching back re-embeds, truthfully."""
    import os
    import time

    src = _write_jsonl(tmp_path / "docs.jsonl", _sample_records())
    out = tmp_path / "out"
    vectors = out / "docs" / ".stages" / "vectors"
    first = _run(_config(src, out))
    minilm_spaces = {p.name for p in vectors.iterdir()}
    assert first.dense_run.total_embeddings_generated == 50 and len(minilm_spaces) == 2  # dense + BM25
    other = _run(_config(src, out, dense_model=str(tiny_dense_model)))
    assert other.dense_run.total_embeddings_generated == 50
    [minilm_dense] = [name for name in minilm_spaces if not _is_sparse_space(vectors / name)]
    [tiny_dense] = {p.name for p in vectors.iterdir()} - minilm_spaces
    month_ago = time.time() - 31 * 86400
    for space in vectors.iterdir():
        os.utime(space, (month_ago, month_ago))

    nightly = _run(_config(src, out, dense_model=str(tiny_dense_model)))
    assert nightly.telemetry.stages["dense"]["cached"] and nightly.telemetry.stages["sparse"]["cached"]
    assert {p.name for p in vectors.iterdir()} == (minilm_spaces - {minilm_dense}) | {tiny_dense}

    back = _run(_config(src, out))
    assert (back.dense_run.total_embeddings_generated, back.dense_run.reused) == (50, 0)
    assert set(back.sparse_run.computed.values()) == {0}  # BM25's space was in use all along
    # Without a retention period every space stays, however old.
    for space in vectors.iterdir():
        os.utime(space, (month_ago, month_ago))
    kept = {p.name for p in vectors.iterdir()}
    _run(_config(src, out, dense_model=str(tiny_dense_model), vector_retention_days=None))
    assert {p.name for p in vectors.iterdir()} == kept


def _is_sparse_space(path: Path) -> bool:
    import pyarrow.parquet as pq

    return "indices" in pq.read_schema(next(path.glob("part-*.parquet"))).names


def test_streaming_windows_change_nothing_but_memory(tmp_path):
    """Windows of 7 chunks (duplicates across windows, a window per row group and more) give the very
    outputs of one window, and an incremental re-run in windows reuses exactly what it should."""
    import pyarrow.parquet as pq

    records = _sample_records()
    # The same text under two ids, far apart: embedded once per window, stored once.
    records.append({"id": "dup-of-0", "text": records[0]["text"], "metadata": {}})
    src = _write_jsonl(tmp_path / "docs.jsonl", records)
    whole = _run(_config(src, tmp_path / "whole", qrels_path=str(SAMPLE_QRELS)))
    windows = _run(_config(src, tmp_path / "windows", stream_window=7, qrels_path=str(SAMPLE_QRELS)))
    assert whole.status == windows.status == "completed"
    assert whole.dense_run.total_embeddings_generated == windows.dense_run.total_embeddings_generated == 50

    def table(summary, name):  # noqa: ANN001, ANN202
        return pq.read_table(summary.exports[name]).to_pydict()

    a, b = table(whole, "dense"), table(windows, "dense")
    assert a["id"] == b["id"] and np.allclose(np.array(a["vector"]), np.array(b["vector"]), atol=1e-5)
    for name in ("sparse", "chunks"):
        assert Path(whole.exports[name]).read_bytes() == Path(windows.exports[name]).read_bytes()
    fused = [Path(s.exports["qdrant"]).read_text().count("\n") for s in (whole, windows)]
    assert fused == [51, 51]
    # The same candidate lists from streamed retrieval: the same metrics for every list.
    assert whole.quality and whole.quality == windows.quality
    assert windows.index_run.points_count == 51

    # An incremental re-run in windows: 3 chunks edited, 2 deleted.
    kept = [r | {"text": r["text"] + " (revised)"} if i in (2, 20, 40) else r
            for i, r in enumerate(records) if i not in (10, 30)]
    _write_jsonl(src, kept)
    again = _run(_config(src, tmp_path / "windows", stream_window=7))
    assert again.dense_run.total_embeddings_generated == 3 and again.dense_run.reused == 46
    assert again.sparse_run.computed == {"qdrant-bm25": 3} and again.sparse_run.reused == {"qdrant-bm25": 46}
    ir = again.index_run
    assert (ir.upserted, ir.deleted, ir.points_count) == (3, 2, 49)


def test_a_sparse_stage_that_reuses_every_vector_warns_of_no_fallback(sample_config):
    """Every BM25 vector comes from the store and no query needs the model: it is not loaded, and the summary
    must not claim that the metadata fallback stood in for it."""
    from flows.embed_collections import embed_collections

    cfg = sample_config.model_copy(update={"queries_path": None, "qrels_path": None, "enable_rerank": False})
    [first] = embed_collections(cfg)
    # sparse_precision is in the sparse stage's key but not in BM25's vector space: the stage runs again
    # and finds every vector stored.
    [again] = embed_collections(cfg.model_copy(update={"sparse_precision": "fp32"}))
    sparse = again.sparse_run
    assert again.telemetry.stages["sparse"]["cached"] is False
    assert not sparse.fallback_used and not sparse.payload.fallback_used
    assert not [w for w in again.warnings if "fallback" in w], again.warnings
    assert again.status == first.status == "completed"
