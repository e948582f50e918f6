"""The whole flow on the sample collection, against the session's temporary Prefect server."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from embedder.io.writers import read_jsonl_records
from embedder.summary import load_summary

pytestmark = pytest.mark.usefixtures("prefect_harness")

EXPORTS = ("dense.parquet", "sparse.jsonl", "qdrant.jsonl", "rerank.jsonl", "rejects.jsonl")


def _run(config):
    from flows.embed_collections import embed_collections

    return embed_collections(config)


def _task_states(flow_run_name: str) -> dict[str, str]:
    """Task name -> state name for the latest subflow run with this name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])),
                                      sort=FlowRunSort.START_TIME_DESC, limit=1)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    return {t.name.rsplit("-", 1)[0]: t.state.name for t in tasks}


@pytest.fixture
def full_config(sample_config, tiny_cross_encoder):
    return sample_config.model_copy(update={"rerank_model": str(tiny_cross_encoder)})


def test_full_run_executes_every_stage(full_config):
    [summary] = _run(full_config)
    out = Path(full_config.output_dir) / "sample"
    for name in EXPORTS + ("processing_summary.json",):
        assert (out / name).is_file(), name
    s = load_summary(out / "processing_summary.json")
    assert s.status == "completed" and s.chunk_count == 50
    assert s.dense_run.status == "executed" and s.dense_run.total_embeddings_generated == 50
    assert s.sparse_run.status == "executed" and s.sparse_run.vectors.coverage_ratio == 1.0
    assert s.sparse_run.payload.sparse_model == "qdrant-bm25" and not s.sparse_run.fallback_used
    assert s.fusion_run.status == "executed" and s.fusion_run.queries == 5
    assert s.rerank_run.status == "executed" and len(s.rerank_run.payload) == 5
    assert all(len(p.candidate_ids) == 50 for p in s.rerank_run.payload)  # 50 chunks < 100 candidates
    assert s.index_run.points_count == 50
    assert {e.stage for e in s.telemetry.lease_events} == {"dense", "rerank"}
    # Each lease says how long it was held and how much of that was the stage's device work.
    assert all(0 < e.gpu_work_s <= e.held_s for e in s.telemetry.lease_events)
    # What the models ran in and how batches were cut, as the host planned it.
    from embedder.gpu import resolve_device
    from embedder.models.engine import resolve_precision

    dense_t = s.telemetry.stages["dense"]
    assert s.dense_run.precision == dense_t["precision"] == resolve_precision("auto", resolve_device())
    assert dense_t["batch_policy"] == ("items" if resolve_device() == "cpu" else "tokens")
    assert dense_t["batches"] >= 1 and dense_t["padding_ratio"] >= 1.0
    assert s.telemetry.stages["rerank"]["precision"] == dense_t["precision"]
    assert set(s.quality) == {"dense", "sparse:qdrant-bm25", "fused_rrf", "fused_dbsf", "reranked"}
    assert s.quality["dense"]["ndcg@10"] > 0.7 and s.quality["sparse:qdrant-bm25"]["ndcg@10"] > 0.5
    assert s.warnings == []
    assert s.feature_toggles.sources["rerank.enabled"] == "default"
    assert s.versions["prefect"] == "3.8.8"

    dense = pq.read_table(out / "dense.parquet")
    assert dense.column_names == ["id", "vector", "model"] and dense.num_rows == 50
    sparse_rows = read_jsonl_records(out / "sparse.jsonl")
    assert set(sparse_rows[0]) == {"id", "sparse_vector", "model", "fallback"}
    point = read_jsonl_records(out / "qdrant.jsonl")[0]
    assert set(point["vector"]) == {"dense", "sparse-qdrant-bm25"} and point["payload"]["text_preview"]
    rr = read_jsonl_records(out / "rerank.jsonl")
    assert [r["query_id"] for r in rr] == ["q1", "q2", "q3", "q4", "q5"]
    assert len(rr[0]["results"]) == 20
    # the run summary is what the flow returned
    assert summary.run_id == s.run_id


def test_rerun_is_cached_idempotent_and_byte_identical(full_config):
    _run(full_config)
    out = Path(full_config.output_dir) / "sample"
    before = {n: (out / n).read_bytes() for n in EXPORTS}
    [s2] = _run(full_config)
    states = _task_states("embed-collection-sample")
    assert states["dense-embed"] == states["sparse-infer"] == states["fuse"] == states["rerank"] == "Cached"
    assert states["load-validate"] == "Cached"
    assert {n: (out / n).read_bytes() for n in EXPORTS} == before
    assert s2.index_run.points_count == 50  # upserts, not duplicates
    assert s2.telemetry.lease_events == []  # cached stages never took the GPU
    assert s2.telemetry.stages["dense"]["cached"] is True
    # The summary counts this run's work: a stage served from cache computed nothing.
    assert (s2.dense_run.total_embeddings_generated, s2.dense_run.reused) == (0, 50)
    assert s2.telemetry.stages["dense"]["items"] == 0 and s2.telemetry.stages["dense"]["reused"] == 50
    assert set(s2.sparse_run.computed.values()) == {0} and set(s2.sparse_run.reused.values()) == {50}


def test_failed_rerank_resumes_from_cache(full_config, monkeypatch):
    import embedder.stages.rerank as rerank_stage

    real = rerank_stage.rerank

    def broken(*args, **kwargs):
        raise RuntimeError("injected rerank failure")

    monkeypatch.setattr(rerank_stage, "rerank", broken)
    [first] = _run(full_config)
    assert first.status == "partial" and first.rerank_run.status == "error"
    assert any("rerank stage failed" in w and "injected rerank failure" in w for w in first.warnings)
    out = Path(full_config.output_dir) / "sample"
    assert (out / "dense.parquet").is_file() and not (out / "rerank.jsonl").exists()

    monkeypatch.setattr(rerank_stage, "rerank", real)
    [second] = _run(full_config)
    states = _task_states("embed-collection-sample")
    assert states["dense-embed"] == "Cached" and states["sparse-infer"] == "Cached"
    assert states["rerank"] == "Completed"
    assert second.status == "completed" and second.rerank_run.status == "executed"

    ref_cfg = full_config.model_copy(update={"output_dir": str(Path(full_config.output_dir).parent / "ref")})
    _run(ref_cfg)
    ref = Path(ref_cfg.output_dir) / "sample"
    for name in EXPORTS:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_changing_rerank_model_reruns_only_rerank(full_config, tmp_path, tiny_cross_encoder):
    import shutil

    _run(full_config)
    other = tmp_path / "other-ce"
    shutil.copytree(tiny_cross_encoder, other)
    _run(full_config.model_copy(update={"rerank_model": str(other)}))
    states = _task_states("embed-collection-sample")
    assert states["dense-embed"] == states["sparse-infer"] == states["fuse"] == "Cached"
    assert states["rerank"] == "Completed"


def test_dense_only_run_says_disabled(sample_config):
    cfg = sample_config.model_copy(update={"enable_sparse": False, "enable_rerank": False})
    [s] = _run(cfg)
    assert s.sparse_run.status == "disabled" and s.rerank_run.status == "disabled"
    assert s.fusion_run.status == "executed"  # dense list only
    assert s.status == "completed" and s.warnings == []
    out = Path(cfg.output_dir) / "sample"
    assert not (out / "rerank.jsonl").exists()


def test_unavailable_rerank_model_is_an_error_not_a_crash(sample_config):
    [s] = _run(sample_config)  # default ms-marco model: not cached on this machine, local_files_only
    assert s.rerank_run.status == "error" and not s.rerank_run.executed
    assert any("not available offline" in w for w in s.warnings)
    assert s.dense_run.status == "executed" and s.sparse_run.status == "executed"
    assert (Path(sample_config.output_dir) / "sample" / "dense.parquet").is_file()


def test_no_queries_skips_fusion_and_rerank_without_inventing(sample_config):
    cfg = sample_config.model_copy(update={"queries_path": None, "qrels_path": None})
    [s] = _run(cfg)
    assert s.fusion_run.status == "skipped" and "never invents" in s.fusion_run.reason
    assert s.rerank_run.status == "skipped"
    assert s.quality is None


def test_unknown_model_fails_before_any_work(sample_config):
    from embedder.errors import CollectionsFailedError

    with pytest.raises(CollectionsFailedError, match="available:") as failed:
        _run(sample_config.model_copy(update={"sparse_models": ["bm99"]}))
    [s] = failed.value.summaries
    assert s.failed_stage == "preflight" and "bm99" in s.warnings[0]
    assert not (Path(sample_config.output_dir) / "sample" / ".stages" / "load").exists()  # no stage ran


def test_artifacts_and_events_are_readable(full_config):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _run(full_config)
    with get_client(sync_client=True) as client:
        keys = {"stage-sample-dense", "stage-sample-sparse", "stage-sample-rerank", "summary-sample",
                "progress-sample-dense", "progress-sample-sparse", "progress-sample-index"}
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=sorted(keys))))
    # Keyed artifacts keep every version (other tests write the same keys): take each key's newest.
    by_key = {a.key: a for a in sorted(arts, key=lambda a: a.created)}
    assert set(by_key) == keys
    table = by_key["stage-sample-dense"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert rows[0]["model"] == "all-minilm-l6-v2" and rows[0]["items"] == 50
    assert "Dense: all-minilm-l6-v2" in by_key["summary-sample"].data
    # Every long stage shows its progress in the UI, and it ends at 100%.
    assert all(float(by_key[f"progress-sample-{stage}"].data) == 100.0 for stage in ("dense", "sparse", "index"))


def test_wiped_output_dir_is_recomputed_not_served_dangling(full_config):
    import shutil

    _run(full_config)
    shutil.rmtree(full_config.output_dir)
    [s] = _run(full_config)
    out = Path(full_config.output_dir) / "sample"
    assert s.status == "completed"
    for name in EXPORTS:
        assert (out / name).is_file(), name
    states = _task_states("embed-collection-sample")
    assert states["dense-embed"] == "Completed"


def test_stage_completed_events_are_emitted(full_config):
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    _run(full_config)
    seen: dict[str, dict] = {}
    # A wait, not a timing check: on a loaded machine the server writes the events well after the run.
    deadline = time.time() + 90
    while time.time() < deadline and not {"dense", "sparse", "rerank"} <= set(seen):
        with get_client(sync_client=True) as client:
            page = client.read_events(filter=EventFilter(event=EventNameFilter(name=["embedder.stage.completed"])),
                                      limit=50)
        seen = {e.payload["stage"]: e.payload for e in page.events if e.payload.get("collection") == "sample"}
        time.sleep(0.5)  # events are written asynchronously
    assert {"dense", "sparse", "rerank"} <= set(seen)
    assert seen["dense"]["items"] == 50 and seen["dense"]["model"] == "all-minilm-l6-v2"
    assert seen["sparse"]["coverage_ratio"] == 1.0
