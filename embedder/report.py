"""Exports and the v4.1 roll-up: turning stage results into files and a true summary."""

from __future__ import annotations

import platform
import shutil
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from embedder.gpu import process_peak_rss_gb
from embedder.io.atomic import atomic_path
from embedder.io.load import LoadResult
from embedder.io.readers import read_qrels
from embedder.io.writers import read_jsonl_records, write_jsonl
from embedder.quality import evaluate
from embedder.schemas import StageTelemetry
from embedder.settings import RunConfig
from embedder.stages import (
    DenseStageResult,
    FusionResult,
    IndexResult,
    RerankStageResult,
    SparseStageResult,
    collection_dir,
    iter_collection_points,
)
from embedder.summary import (
    DenseRun,
    FeatureToggles,
    FusionRun,
    GpuBaseline,
    LeaseEvent,
    PerformanceBaseline,
    ProcessingSummary,
    RejectsInfo,
    RerankRun,
    SparseRun,
    SparseVectorsStats,
    SystemBaseline,
    Telemetry,
    write_summary,
)

_VERSIONED = ("torch", "sentence-transformers", "transformers", "fastembed", "qdrant-client", "prefect", "pyarrow")


def library_versions() -> dict[str, str]:
    """Versions of python and the libraries that shape the outputs."""
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _copy_atomic(src: str, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def write_exports(
    config: RunConfig,
    collection: str,
    load: LoadResult,
    dense: DenseStageResult | None,
    sparse: SparseStageResult | None,
    rerank: RerankStageResult | None,
    run_path: str | Path,
) -> dict[str, str]:
    """Write the collection's exports into its run set; return name -> path of each file written.

    ``dense.parquet``, ``sparse.jsonl`` and ``qdrant.jsonl`` need the dense stage;
    ``rerank.jsonl`` needs an executed rerank; ``rejects.jsonl`` is always written.
    """
    cdir = Path(run_path)
    out: dict[str, str] = {}
    _copy_atomic(load.rejects.path, cdir / "rejects.jsonl")
    out["rejects"] = str(cdir / "rejects.jsonl")
    # The validated chunk table (full texts), for the search service's rerank pass.
    out["chunks"] = load.chunks.path
    if dense is not None:
        _copy_atomic(dense.vectors.path, cdir / "dense.parquet")
        out["dense"] = str(cdir / "dense.parquet")
    if sparse is not None and sparse.outputs:
        rows = (rec for o in sparse.outputs for rec in read_jsonl_records(o.vectors.path))
        write_jsonl(cdir / "sparse.jsonl", ({k: r[k] for k in ("id", "sparse_vector", "model", "fallback")}
                                            for r in rows))
        out["sparse"] = str(cdir / "sparse.jsonl")
    if dense is not None and sparse is not None:
        batches = iter_collection_points(config, collection, load.chunks, dense, sparse)
        write_jsonl(cdir / "qdrant.jsonl", (p for batch in batches for p in batch))
        out["qdrant"] = str(cdir / "qdrant.jsonl")
    if rerank is not None and rerank.status == "executed" and rerank.results is not None:
        _copy_atomic(rerank.results.path, cdir / "rerank.jsonl")
        out["rerank"] = str(cdir / "rerank.jsonl")
    return out


def compute_quality(config: RunConfig, fusion: FusionResult | None,
                    rerank: RerankStageResult | None) -> dict[str, dict[str, float]] | None:
    """nDCG@10 and Recall@100 for every list the run produced, when qrels were given."""
    if not config.qrels_path or fusion is None or fusion.candidates is None:
        return None
    qrels = read_qrels(config.qrels_path)
    rows = read_jsonl_records(fusion.candidates.path)
    runs: dict[str, dict[str, list[str]]] = {"dense": {}, "fused_rrf": {}, "fused_dbsf": {}}
    for row in rows:
        q = row["query_id"]
        runs["dense"][q] = [c["id"] for c in row["dense"]]
        for i, (model, lst) in enumerate(row["sparse"].items()):
            runs.setdefault("sparse" if i == 0 else f"sparse:{model}", {})[q] = [c["id"] for c in lst]
        runs["fused_rrf"][q] = [c["id"] for c in row["rrf"]]
        runs["fused_dbsf"][q] = [c["id"] for c in row["dbsf"]]
    if rerank is not None and rerank.status == "executed" and rerank.results is not None:
        # Reranked top-k first, then the rest of the fused list, so Recall@100 compares like with like.
        fused = runs["fused_rrf" if config.fusion == "rrf" else "fused_dbsf"]
        reranked = {}
        for rec in read_jsonl_records(rerank.results.path):
            head = [c["id"] for c in rec["results"]]
            reranked[rec["query_id"]] = head + [d for d in fused.get(rec["query_id"], []) if d not in set(head)]
        runs["reranked"] = reranked
    return {name: evaluate(run, qrels) for name, run in runs.items()}


def build_summary(
    config: RunConfig,
    collection: str,
    run_id: uuid.UUID,
    *,
    latency_seconds: float,
    load: LoadResult | None,
    dense: DenseStageResult | None,
    sparse: SparseStageResult | None,
    index: IndexResult | None,
    fusion: FusionResult | None,
    rerank: RerankStageResult | None,
    exports: dict[str, str],
    lease_events: list[dict[str, Any]],
    stage_errors: dict[str, str],
    cached_stages: set[str] | None = None,
    quality: dict[str, dict[str, float]] | None = None,
) -> ProcessingSummary:
    """Roll every stage's result up into a v4.1 summary whose warnings say what went wrong.

    Args:
        stage_errors: Stage name -> error message for stages that failed outright.
        cached_stages: Stages whose result came from the cache.
    """
    cached = cached_stages or set()
    warnings: list[str] = []
    stages: dict[str, dict[str, Any]] = {}

    def add_stage(t: StageTelemetry | None, name: str) -> None:
        if t is not None:
            stages[name] = t.model_copy(update={"cached": name in cached}).model_dump()

    if load is not None:
        warnings.extend(load.warnings)
    for stage, err in stage_errors.items():
        warnings.append(f"{stage} stage failed: {err}")

    dense_run = None
    if dense is not None:
        t = dense.telemetry
        add_stage(t, "dense")
        warnings.extend(t.warnings)
        dense_run = DenseRun(model_name=dense.model_name, device=t.device, batch_size=t.batch_size or 0,
                             total_embeddings_generated=dense.computed, reused=dense.reused,
                             latency_ms=t.latency_ms, gpu_peak_gb=t.gpu_peak_gb,
                             status="executed", initial_batch_size=t.initial_batch_size, backoffs=t.backoffs,
                             items_per_s=t.items_per_s, cached="dense" in cached)
    elif "dense" in stage_errors:
        dense_run = DenseRun(model_name=config.dense_model, device="unknown", batch_size=0,
                             total_embeddings_generated=0, latency_ms=0.0, gpu_peak_gb=0.0, status="error",
                             reason=stage_errors["dense"])

    if sparse is not None and sparse.status == "executed":
        total = sum(o.vectors.items for o in sparse.outputs)
        available = sum(o.available for o in sparse.outputs)
        fallback_used = any(o.run.fallback_used for o in sparse.outputs)
        for o in sparse.outputs:
            add_stage(o.telemetry, "sparse" if len(sparse.outputs) == 1 else f"sparse:{o.model_name}")
        warnings.extend(sparse.warnings)
        if fallback_used:
            fb = sum(o.run.fallback_count for o in sparse.outputs)
            warnings.append(f"sparse metadata fallback used for {fb} chunk(s)")
        sparse_run = SparseRun(
            enabled=True, executed=True, status="executed", model_names=[o.model_name for o in sparse.outputs],
            fallback_used=fallback_used,
            vectors=SparseVectorsStats(total=total, available=available,
                                       coverage_ratio=available / total if total else 1.0),
            payload=sparse.outputs[0].run if sparse.outputs else None,
            payloads=[o.run.model_dump(mode="json") for o in sparse.outputs[1:]],
            cached="sparse" in cached,
            computed={o.model_name: o.computed for o in sparse.outputs},
            reused={o.model_name: o.reused for o in sparse.outputs},
        )
    elif sparse is not None:
        sparse_run = SparseRun(enabled=config.enable_sparse, executed=False, status=sparse.status,
                               model_names=config.sparse_models, reason=sparse.reason)
    else:
        status = "error" if "sparse" in stage_errors else "skipped"
        sparse_run = SparseRun(enabled=config.enable_sparse, executed=False,
                               status=status if config.enable_sparse else "disabled", model_names=config.sparse_models,
                               reason=stage_errors.get("sparse", "an earlier stage failed"))
    if sparse_run.enabled and sparse_run.payload is None:
        warnings.append("sparse is enabled but the sparse_run payload is missing"
                        + (f": {sparse_run.reason}" if sparse_run.reason else ""))

    if fusion is not None:
        fusion_run = FusionRun(method=fusion.method, k=fusion.k, queries=fusion.queries, latency_ms=fusion.latency_ms,
                               status=fusion.status, reason=fusion.reason)
        stages["fuse"] = StageTelemetry(stage="fuse", items=fusion.queries, latency_ms=fusion.latency_ms,
                                        cached="fuse" in cached).model_dump()
    else:
        fusion_run = FusionRun(method=config.fusion, k=config.rrf_k, status="error" if "fuse" in stage_errors
                               else "skipped", reason=stage_errors.get("fuse", "an earlier stage failed"))

    if rerank is not None:
        add_stage(rerank.telemetry, "rerank")
        warnings.extend(rerank.warnings)
        rerank_run = RerankRun(
            enabled=config.enable_rerank, executed=rerank.status == "executed", status=rerank.status,
            model_name=rerank.model_name, device=rerank.device, top_k_candidates=config.rerank_top_k_candidates,
            rerank_top_k=config.rerank_top_k, payload=rerank.runs, reason=rerank.reason,
            cached="rerank" in cached,
        )
    else:
        status = "error" if "rerank" in stage_errors else "skipped"
        rerank_run = RerankRun(enabled=config.enable_rerank, executed=False,
                               status=status if config.enable_rerank else "disabled", model_name=config.rerank_model,
                               top_k_candidates=config.rerank_top_k_candidates, rerank_top_k=config.rerank_top_k,
                               reason=stage_errors.get("rerank", "an earlier stage failed"))
    if rerank_run.enabled and not rerank_run.payload:
        warnings.append("rerank is enabled but the rerank_run payload is missing"
                        + (f": {rerank_run.reason}" if rerank_run.reason else ""))

    index_run = index.model_dump() if index is not None else {
        "status": "error" if "index" in stage_errors else "skipped",
        "reason": stage_errors.get("index", "an earlier stage failed"),
    }
    if index is not None:
        stages["index"] = StageTelemetry(stage="index", items=index.upserted, latency_ms=index.latency_ms,
                                         items_per_s=index.points_per_s, batch_size=index.batch_size,
                                         cached="index" in cached).model_dump()
        warnings.extend(index.warnings)

    gpu_peak = max([s.get("gpu_peak_gb", 0.0) for s in stages.values()] + [0.0])
    # Dense, index and exports are what a collection is for; without them the run failed.
    run_failed = dense is None or "index" in stage_errors or "export" in stage_errors
    chunk_count = load.chunk_count if load else 0
    out_of_sync = index is not None and index.points_count != chunk_count
    degraded = (bool(stage_errors) or sparse_run.status == "error" or rerank_run.status == "error"
                or out_of_sync)
    # A config built without resolve_run_config (a UI form, a test) has no recorded sources:
    # explicitly given values count as overrides, the rest as defaults.
    toggles_sources = {
        name: config.sources.get(name, "cli" if name in config.model_fields_set else "default")
        for name in RunConfig.model_fields if name != "sources"
    }
    return ProcessingSummary(
        collection=collection,
        chunk_count=load.chunk_count if load else 0,
        run_id=run_id,
        status="failed" if run_failed else ("partial" if degraded else "completed"),
        feature_toggles=FeatureToggles(enable_rerank=config.enable_rerank, enable_sparse=config.enable_sparse,
                                       sparse_models=config.sparse_models, sources=toggles_sources),
        dense_run=dense_run,
        sparse_run=sparse_run,
        rerank_run=rerank_run,
        fusion_run=fusion_run,
        index_run=index_run,
        telemetry=Telemetry(lease_events=[LeaseEvent(**e) for e in lease_events], stages=stages),
        performance_baseline=PerformanceBaseline(
            latency_seconds=latency_seconds,
            gpu=GpuBaseline(soft_limit_gb=config.gpu_memory_ceiling_gb, peak_memory_used_gb=gpu_peak,
                            soft_limit_exceeded=gpu_peak > config.gpu_memory_ceiling_gb),
            system=SystemBaseline(peak_memory_gb=process_peak_rss_gb()),
        ),
        quality=quality,
        rejects=RejectsInfo(count=load.reject_count if load else 0,
                            path=exports.get("rejects")),
        exports=exports,
        versions=library_versions(),
        model_fingerprints=_fingerprints(config),
        config=config.model_dump(mode="json", exclude={"sources"}),
        warnings=list(dict.fromkeys(warnings)),
    )


def _fingerprints(config: RunConfig) -> dict[str, str]:
    from embedder.stages import model_fingerprint

    roles: list[tuple[str, Any]] = [(config.dense_model, "dense")]
    roles += [(m, "sparse") for m in config.sparse_models] if config.enable_sparse else []
    roles += [(config.rerank_model, "rerank")] if config.enable_rerank else []
    return {name: model_fingerprint(name, role, config.local_files_only) for name, role in roles}


def write_collection_summary(summary: ProcessingSummary, run_path: str | Path) -> Path:
    """Write the summary into its run set, beside the exports it describes."""
    return write_summary(summary, Path(run_path) / "processing_summary.json")


def new_run_set(config: RunConfig, collection: str, run_id: uuid.UUID) -> str:
    """A fresh run-set directory for one collection (one per attempt: a retry never writes into a published set)."""
    from datetime import UTC, datetime

    from embedder.io.runset import run_dir

    name = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{str(run_id)[:8]}-{uuid.uuid4().hex[:6]}"
    return str(run_dir(config.output_dir, collection, name))


def publish_run_set(config: RunConfig, collection: str, run_path: str | Path) -> Path:
    """Publish a run set (exports, summary, index manifest) with one switch; return the summary's stable path.

    Run sets and Edge shards that nothing refers to any more are removed afterwards.
    """
    from embedder.io.edge_store import EdgeStore
    from embedder.io.runset import publish_run

    publish_run(config.output_dir, collection, Path(run_path))
    EdgeStore(config.output_dir).collect_garbage(collection)
    return collection_dir(config, collection) / "processing_summary.json"
