"""Faults injected into the real flow: bad input, unavailable models, OOM, Qdrant down, secrets, query policy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from embedder.errors import EmbedderError
from embedder.io.writers import read_jsonl_records
from embedder.settings import CollectionInput
from embedder.summary import load_summary
from tests.conftest import SAMPLE_DIR

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _run(config):
    from flows.embed_collections import embed_collections

    return embed_collections(config)


def _bad_collection(path: Path) -> tuple[Path, set[str]]:
    good = [{"id": f"good-{i}", "text": t, "metadata": {"document_id": "d"}} for i, t in enumerate(
        ["Honeybees pollinate almonds.", "Volcanoes erupt ash.", "Tides follow the Moon.", "Espresso needs pressure."])]
    lines = [json.dumps(r).encode() for r in good]
    lines += [
        b'{"id": "bad-json", "text": "oops',
        json.dumps({"id": "no-text"}).encode(),
        json.dumps({"id": "empty", "text": ""}).encode(),
        json.dumps({"id": "blank", "text": "   \t"}).encode(),
        json.dumps({"id": "good-0", "text": "duplicate id"}).encode(),
        b'{"id": "bytes", "text": "caf\xe9 au lait"}',
        json.dumps({"id": "meta-type", "text": "fine", "metadata": {"token_count": "twelve"}}).encode(),
        json.dumps({"id": "huge", "text": "gigantic chunk " * 70_000}).encode(),  # ~1 MB: truncated, kept
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, {r["id"] for r in good} | {"huge"}


def test_bad_input_every_good_chunk_exported_every_bad_one_explained(sample_config, tmp_path):
    data, good_ids = _bad_collection(tmp_path / "mixed.jsonl")
    cfg = sample_config.model_copy(update={"collections": [CollectionInput(name="mixed", path=str(data))],
                                           "queries_path": None, "qrels_path": None})
    [s] = _run(cfg)
    out = Path(cfg.output_dir) / "mixed"
    exported = set(pq.read_table(out / "dense.parquet")["id"].to_pylist())
    assert exported == good_ids
    assert {r["id"] for r in read_jsonl_records(out / "sparse.jsonl")} == good_ids
    assert len(read_jsonl_records(out / "qdrant.jsonl")) == len(good_ids) == s.index_run.points_count
    rejects = read_jsonl_records(out / "rejects.jsonl")
    reasons = sorted(r["reason"].split(":")[0].split(" (")[0] for r in rejects)
    assert reasons == sorted(["malformed JSON", "missing text", "empty text", "whitespace-only text",
                              "duplicate id 'good-0'", "undecodable bytes",
                              "metadata.token_count must be int, got str"])
    assert s.rejects.count == 7
    assert any("7 record(s) rejected" in w for w in s.warnings)
    assert any("truncated" in w for w in s.warnings)


def test_unavailable_dense_model_fails_before_gpu_work(sample_config):
    from embedder.errors import CollectionsFailedError

    with pytest.raises(CollectionsFailedError, match="not available offline") as failed:
        _run(sample_config.model_copy(update={"dense_model": "BAAI/bge-small-en-v1.5"}))
    [s] = failed.value.summaries
    assert s.status == "failed" and s.failed_stage == "preflight" and s.dense_run is None
    out = Path(sample_config.output_dir) / "sample"
    # The run that started left its summary, and nothing else: no stage ran.
    assert load_summary(out / "processing_summary.json").run_id == s.run_id
    assert not (out / "dense.parquet").exists() and not (out / ".stages" / "dense").exists()


def test_unavailable_sparse_model_falls_back_to_metadata(sample_config, monkeypatch):
    import embedder.stages.sparse as sparse_stage
    from embedder.errors import ModelUnavailableError

    def unavailable(*args, **kwargs):
        raise ModelUnavailableError("sparse model 'qdrant-bm25' could not be loaded (injected)")

    monkeypatch.setattr(sparse_stage, "load_sparse_model", unavailable)
    [s] = _run(sample_config)
    assert s.sparse_run.fallback_used and s.sparse_run.payload.fallback_used
    assert s.status == "partial"
    assert s.sparse_run.payload.fallback_count == 50 and s.sparse_run.vectors.coverage_ratio == 1.0
    assert any("metadata fallback" in w for w in s.warnings)
    # fallback vectors live in the live model's index space: BM25 retrieval still finds the answers
    assert s.quality["sparse:qdrant-bm25"]["ndcg@10"] > 0.5


class _FailsOn:
    """A loaded sparse model that raises on any batch holding one of ``poison`` (the first texts it is given)."""

    def __init__(self, model, poison: set[str], first: int) -> None:
        self._model, self._poison, self._first = model, poison, first

    def __getattr__(self, name):
        return getattr(self._model, name)

    def embed(self, texts):
        texts = list(texts)
        if not self._poison:
            self._poison.update(texts[: self._first])
        if self._poison.intersection(texts):
            raise RuntimeError("the sparse model failed (injected)")
        return self._model.embed(texts)


def test_chunks_a_sparse_model_failed_on_are_retried_by_the_next_run_and_only_they(sample_config, monkeypatch,
                                                                                   tmp_path):
    """A partial sparse result is never served again: the next run embeds exactly the failed chunks live."""
    import embedder.stages.sparse as sparse_stage

    config = sample_config.model_copy(update={"enable_rerank": False})
    real_load, poison = sparse_stage.load_sparse_model, set()
    monkeypatch.setattr(sparse_stage, "load_sparse_model",
                        lambda *a, **kw: _FailsOn(real_load(*a, **kw), poison, first=3))
    out = Path(config.output_dir) / "sample"
    [first] = _run(config)
    assert len(poison) == 3
    assert first.status == "partial" and first.sparse_run.payload.fallback_count == 3
    assert any("failed on 3 chunk(s)" in w for w in first.warnings), first.warnings
    assert sum(r["fallback"] for r in read_jsonl_records(out / "sparse.jsonl")) == 3

    monkeypatch.setattr(sparse_stage, "load_sparse_model", real_load)
    [second] = _run(config)
    assert second.status == "completed", second.warnings
    assert not second.sparse_run.cached and not second.sparse_run.fallback_used
    assert (second.sparse_run.computed, second.sparse_run.reused) == ({"qdrant-bm25": 3}, {"qdrant-bm25": 47})
    assert second.dense_run.cached  # nothing but the failed sparse vectors is redone
    # What the exports hold now is what a clean run computes. (The sample's term weights hold every
    # term of each chunk, so its fallback vectors equal the live ones and the index has nothing to change.)
    assert second.index_run.action == "unchanged"
    [clean] = _run(config.model_copy(update={"output_dir": str(tmp_path / "clean")}))
    assert clean.status == "completed"
    vectors = {r["id"]: r["sparse_vector"] for r in read_jsonl_records(out / "sparse.jsonl")}
    assert vectors == {r["id"]: r["sparse_vector"] for r in read_jsonl_records(tmp_path / "clean/sample/sparse.jsonl")}

    [third] = _run(config)  # a complete result is served from the cache
    assert third.status == "completed" and third.sparse_run.cached


def _oom_above(real, rows_limit):
    """A forward factory that raises a CUDA OOM for any batch of more than ``rows_limit`` rows."""

    def factory(model):
        forward = real(model)

        def run(features):
            if features["input_ids"].shape[0] > rows_limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return forward(features)

        return run

    return factory


def _halvings(stage):
    """The budget sizes a stage tried, in order, and the unit the plan cut by (from its own telemetry)."""
    unit = "tokens" if stage["batch_policy"] == "tokens" else "rows"
    first = stage["initial_token_budget"] if unit == "tokens" else stage["initial_batch_size"]
    return first, unit


def test_nan_vectors_fail_dense_and_never_reach_the_store_or_an_export(sample_config, monkeypatch):
    """A model that overflows (one NaN row in a batch) fails the stage; the re-run embeds everything anew."""
    import numpy as np

    from embedder.errors import CollectionsFailedError
    from embedder.io.vector_cache import DenseVectorCache, NonFiniteVectorError, SparseVectorCache
    from embedder.models import dense as dense_mod
    from embedder.schemas import SparseVector

    real = dense_mod.dense_forward

    def overflowing(model):
        forward = real(model)

        def run(features):
            out = forward(features)
            out[0, 0] = float("nan")
            return out

        return run

    monkeypatch.setattr(dense_mod, "dense_forward", overflowing)
    out = Path(sample_config.output_dir) / "sample"
    with pytest.raises(CollectionsFailedError) as failed:
        _run(sample_config)
    [s] = failed.value.summaries
    assert s.status == "failed" and s.failed_stage == "dense"
    assert any("NaN or infinite vectors" in w for w in s.warnings), s.warnings
    # Nothing poisoned the store: no dense part at all (the sparse stage's own BM25 part is sound).
    parts = list((out / ".stages" / "vectors").glob("*/part-*.parquet"))
    assert not [p for p in parts if "vector" in pq.read_schema(p).names]
    assert not (out / "dense.parquet").exists()

    monkeypatch.setattr(dense_mod, "dense_forward", real)
    [again] = _run(sample_config)
    assert again.status in ("completed", "partial") and again.dense_run.reused == 0
    assert again.dense_run.total_embeddings_generated == again.chunk_count
    vectors = np.asarray(pq.read_table(out / "dense.parquet")["vector"].to_pylist(), dtype=np.float32)
    assert np.isfinite(vectors).all()

    # Every store refuses such vectors itself, whichever stage offers them.
    with pytest.raises(NonFiniteVectorError):
        DenseVectorCache(out / "direct-dense").append({"a" * 64: np.array([0.1, float("inf")], dtype=np.float32)})
    with pytest.raises(NonFiniteVectorError, match="1 of 2 vectors"):
        SparseVectorCache(out / "direct-sparse").append({"b" * 64: SparseVector(indices=[1, 2], values=[0.5, 1.0]),
                                                         "c" * 64: SparseVector(indices=[3], values=[float("nan")])})
    with pytest.raises(NonFiniteVectorError, match="1 of 1 vectors"):  # past float32's range: stored as inf
        SparseVectorCache(out / "direct-sparse").append({"d" * 64: SparseVector(indices=[4], values=[1e39])})
    assert not list(out.glob("direct-*/part-*.parquet"))


def test_oom_in_dense_and_rerank_backs_off_and_completes(sample_config, tiny_cross_encoder, monkeypatch, tmp_path):
    from embedder.models import dense as dense_mod
    from embedder.models import rerank as rerank_mod

    config = sample_config.model_copy(update={"rerank_model": str(tiny_cross_encoder)})
    [clean] = _run(config.model_copy(update={"output_dir": str(tmp_path / "clean")}))
    monkeypatch.setattr(dense_mod, "dense_forward", _oom_above(dense_mod.dense_forward, 16))
    monkeypatch.setattr(rerank_mod, "rerank_forward", _oom_above(rerank_mod.rerank_forward, 8))
    [s] = _run(config)
    assert s.status == "completed"
    # Whatever the host planned (rows on the CPU, padded tokens on a GPU), each OOM halved it,
    # starting from the plan, until a batch fit.
    for name, limit in (("dense", 16), ("rerank", 8)):
        stage = s.telemetry.stages[name]
        first, unit = _halvings(stage)
        backoffs = stage["backoffs"]
        assert backoffs and backoffs[0] == first, (name, stage)
        assert all(b == a // 2 for a, b in zip(backoffs, backoffs[1:]))
        assert stage["batch_size"] <= limit
        assert any(w.startswith(f"{name} batch backed off after OOM: {backoffs[0]} -> ") and w.endswith(unit)
                   for w in s.warnings), s.warnings
    assert s.dense_run.backoffs == s.telemetry.stages["dense"]["backoffs"]
    assert s.rerank_run.status == "executed" and all(p.batch_size <= 8 for p in s.rerank_run.payload)
    # Backing off changes batches, never results.
    out, ref = Path(config.output_dir) / "sample", tmp_path / "clean" / "sample"
    a, b = pq.read_table(out / "dense.parquet"), pq.read_table(ref / "dense.parquet")
    assert a["id"].to_pylist() == b["id"].to_pylist()
    assert torch.allclose(torch.tensor(a["vector"].to_pylist()), torch.tensor(b["vector"].to_pylist()), atol=1e-5)
    for p, q in zip(s.rerank_run.payload, clean.rerank_run.payload):
        assert p.candidate_ids == q.candidate_ids and torch.allclose(torch.tensor(p.scores), torch.tensor(q.scores),
                                                                     atol=1e-5)


def test_qdrant_down_retries_then_fails_clearly_with_exports_written(sample_config, monkeypatch, capfd, caplog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from tests.conftest import free_port

    monkeypatch.setenv("QDRANT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("QDRANT_API_KEY", "sk-test-secret-123")
    monkeypatch.setenv("EMBEDDER_QDRANT_TIMEOUT_S", "2")
    with pytest.raises(EmbedderError, match="index"):
        _run(sample_config)
    out = Path(sample_config.output_dir) / "sample"
    # The collection failed: its summary says why, and nothing it half-produced sits beside it.
    s = load_summary(out / "processing_summary.json")
    assert not (out / "dense.parquet").exists() and not (out / "qdrant.jsonl").exists()
    assert s.index_run.status == "error" and s.status == "failed" and s.failed_stage == "index"
    assert s.exports_run_id is None and set(s.exports) == {"rejects"}
    assert any("no earlier run was published" in w for w in s.warnings)
    assert any(w.startswith("index stage failed: VectorIndexError") for w in s.warnings)
    assert s.fusion_run.status == "executed"  # fusion does not depend on the index
    # the API key is nowhere: not in the outputs, the flow parameters, the artifacts or the logs
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl"):
            assert "sk-test-secret-123" not in f.read_text(errors="replace"), f
    captured = capfd.readouterr()
    # Prefect's console handler or pytest's log capture, depending on how the session was started.
    logged = captured.out + captured.err + caplog.text
    assert "sk-test-secret-123" not in logged
    assert "Qdrant at http://127.0.0.1" in logged  # the failure itself was logged
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["embed-sample"])))
        assert runs and all("sk-test-secret-123" not in json.dumps(r.parameters, default=str) for r in runs)
        assert all("sk-test-secret-123" not in json.dumps(a.data, default=str) for a in client.read_artifacts())


def test_index_task_retried_before_failing(sample_config, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from tests.conftest import free_port

    monkeypatch.setenv("QDRANT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(EmbedderError):
        _run(sample_config)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="qdrant-index")),
                                     limit=50)
    latest = max(runs, key=lambda r: r.expected_start_time)
    assert latest.run_count == 4 and latest.state.is_failed()  # 1 try + 3 retries


def test_hash_query_policy_leaves_no_raw_query_anywhere(sample_config, tiny_cross_encoder):
    from prefect.client.orchestration import get_client

    from embedder.settings import QueryPolicy
    from tests.conftest import SAMPLE_QUERIES

    cfg = sample_config.model_copy(update={"rerank_model": str(tiny_cross_encoder),
                                           "query_policy": QueryPolicy(mode="hash")})
    [s] = _run(cfg)
    raw = [json.loads(line)["text"] for line in SAMPLE_QUERIES.read_text().splitlines()]
    assert all(p.query.startswith("sha256:") for p in s.rerank_run.payload)
    texts = [f.read_text(errors="replace") for f in Path(cfg.output_dir).rglob("*")
             if f.is_file() and f.suffix in (".json", ".jsonl")]
    with get_client(sync_client=True) as client:
        texts += [json.dumps(a.data) if not isinstance(a.data, str) else a.data for a in client.read_artifacts()]
    for q in raw:
        assert not any(q in t for t in texts), q


def test_persisted_results_are_json_never_pickle(sample_config):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    _run(sample_config)
    files = [f for f in Path(PREFECT_LOCAL_STORAGE_PATH.value()).rglob("*") if f.is_file()]
    assert files
    for f in files:
        try:
            record = json.loads(f.read_text())  # every record parses as JSON
        except json.JSONDecodeError as exc:
            raise AssertionError(f"{f} is not JSON: {f.read_bytes()[:120]!r}") from exc
        if "metadata" in record:  # a result record; the other shape is a JSON-encoded exception
            assert record["metadata"]["serializer"]["type"] == "json", f
        else:
            assert "__exc_type__" in record, f
        # base64 of a pickle stream starts with "gAS"/"gAV" (protocol 4/5); never anywhere
        assert not re.search(r'"gA[SV]', f.read_text()), f
    # Nor in the output dir: the index is Qdrant Edge, not qdrant-client's local mode (which pickles points
    # into storage.sqlite); no file there is a pickle stream.
    out_files = [f for f in Path(sample_config.output_dir).rglob("*") if f.is_file()]
    assert any("shards" in f.parts for f in out_files)
    for f in out_files:
        assert f.name != "storage.sqlite", f
        head = f.read_bytes()[:2]
        assert not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5), f


def test_unsafe_collection_name_refused_by_cli(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--input", str(SAMPLE_DIR), "--collection",
                        "../../escape", "--output-dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "is not allowed" in r.stderr
    assert list(tmp_path.iterdir()) == []
