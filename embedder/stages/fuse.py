"""The fusion stage: dense and sparse candidates per real query, fused with RRF and DBSF."""

from __future__ import annotations

import functools
import time

from pydantic import BaseModel

from embedder.fusion import fuse_dbsf, fuse_rrf, stream_dense_candidates, stream_sparse_candidates
from embedder.io.writers import iter_dense_windows, read_dense_parquet, read_jsonl_records, write_jsonl
from embedder.models.registry import get_spec
from embedder.schemas import SparseVector, StageRef, StageTelemetry
from embedder.settings import RunConfig
from embedder.stages.common import Status, SummarySection, seal, stage_dir, stage_key
from embedder.stages.dense import DenseStageResult
from embedder.stages.sparse import SparseStageResult, iter_sparse_windows
from embedder.summary import FusionRun


class FusionResult(BaseModel):
    """Per-query candidate lists (dense, each sparse, RRF, DBSF), by reference."""

    status: Status
    method: str
    k: int | None = None
    queries: int = 0
    latency_ms: float = 0.0
    candidates: StageRef | None = None
    lists: list[str] | None = None
    weights: dict[str, float] | None = None
    reason: str | None = None


def fuse_stage(config: RunConfig, collection: str, dense: DenseStageResult, sparse: SparseStageResult,
               key: str) -> FusionResult:
    """Retrieve dense and sparse candidates per real query and fuse them with RRF and DBSF."""
    if not config.queries_path or dense.query_vectors is None:
        return seal(stage_dir(config, collection, "fuse", key), FusionResult(
            status="skipped", method=config.fuse.method, k=config.fuse.rrf_k,
            reason="no query set was given (--queries); fusion never invents queries"))
    t0 = time.perf_counter()
    window = config.stream.window
    n = config.fuse.retrieval_top_n
    qids, qvecs = read_dense_parquet(dense.query_vectors.path)
    # Each list streams the collection a window at a time: only the queries' best candidates are held.
    lists_per_model = [stream_dense_candidates(iter_dense_windows(dense.vectors.path, window), qvecs, n)]
    for out in sparse.outputs:
        queries = ({r["id"]: SparseVector(**r["sparse_vector"]) for r in read_jsonl_records(out.query_vectors.path)}
                   if out.query_vectors else {})
        lists_per_model.append(stream_sparse_candidates(
            functools.partial(iter_sparse_windows, out.vectors, window), [queries.get(q, SparseVector()) for q in qids],
            n, use_idf=get_spec(out.model_name, "sparse").requires_idf))
    rows = []
    # Weights follow the lists (dense, then each sparse model that ran).
    names = ["dense", *(o.model_name for o in sparse.outputs)]
    weights = [config.fuse.weights.get(name, 1.0) for name in names]
    weights_or_none = weights if config.fuse.weights else None
    for qi, qid in enumerate(qids):
        lists = [per_model[qi] for per_model in lists_per_model]
        rrf = fuse_rrf([[c.id for c in lst] for lst in lists], k=config.fuse.rrf_k, weights=weights_or_none)[:n]
        dbsf = fuse_dbsf(lists, weights=weights_or_none)[:n]
        rows.append({
            "query_id": qid,
            "dense": [c.model_dump() for c in lists[0]],
            "sparse": {o.model_name: [c.model_dump() for c in lst] for o, lst in zip(sparse.outputs, lists[1:])},
            "rrf": [c.model_dump() for c in rrf],
            "dbsf": [c.model_dump() for c in dbsf],
        })
    path = stage_dir(config, collection, "fuse", key)
    ref = write_jsonl(path / "candidates.jsonl", rows)
    return seal(path, FusionResult(status="executed", method=config.fuse.method,
                                   k=config.fuse.rrf_k if config.fuse.method == "rrf" else None, queries=len(rows),
                                   latency_ms=(time.perf_counter() - t0) * 1000, candidates=ref, lists=names,
                                   weights=dict(zip(names, weights)) if weights_or_none else None))


def fuse_key(config: RunConfig, collection: str, dense: DenseStageResult, sparse: SparseStageResult) -> str:
    """Cache key of the fusion stage."""
    sparse_digests = [(o.model_name, o.vectors.digest, o.query_vectors.digest if o.query_vectors else None)
                      for o in sparse.outputs]
    return stage_key(config, collection, "fuse", dense.vectors.digest,
                     dense.query_vectors.digest if dense.query_vectors else None, sparse_digests)


def fusion_section(config: RunConfig, fusion: FusionResult | None, error: str | None,
                   cached: bool) -> SummarySection:
    """``fusion_run``: the method, its k and how many real queries were fused."""
    if fusion is None:
        return SummarySection(fields={"fusion_run": FusionRun(
            method=config.fuse.method, k=config.fuse.rrf_k, status="error" if error else "skipped",
            reason=error or "an earlier stage failed")})
    run = FusionRun(method=fusion.method, k=fusion.k, queries=fusion.queries, latency_ms=fusion.latency_ms,
                    status=fusion.status, reason=fusion.reason, lists=fusion.lists, weights=fusion.weights,
                    candidates_path=fusion.candidates.path if fusion.candidates else None)
    telemetry = StageTelemetry(stage="fuse", items=fusion.queries, latency_ms=fusion.latency_ms, cached=cached)
    return SummarySection(fields={"fusion_run": run}, stages={"fuse": telemetry.model_dump()})
