"""The rerank stage: a CrossEncoder pass over each real query's fused candidates."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, Field

from embedder.errors import ModelUnavailableError
from embedder.gpu import cuda_context_gb, resolve_device
from embedder.io.readers import read_queries
from embedder.io.writers import iter_jsonl_records, iter_table_windows, write_jsonl
from embedder.lease import GpuLease
from embedder.models.engine import TokenBudget, plan_on_device, resolve_precision
from embedder.models.registry import resolve_model
from embedder.models.rerank import RerankEncoder, rerank
from embedder.schemas import CrossEncoderRerankRun, StageRef, StageTelemetry
from embedder.settings import RunConfig
from embedder.stages.common import (
    Status,
    SummarySection,
    model_fingerprint,
    seal,
    stage_dir,
    stage_key,
    timed_load,
)
from embedder.stages.fuse import FusionResult
from embedder.summary import LeaseEvent, RerankPayload, RerankRun
from embedder.tuning import query_lists


class RerankStageResult(BaseModel):
    """Reranked lists by reference, the per-query runs and telemetry."""

    status: Status
    model_name: str | None = None
    device: str | None = None
    results: StageRef | None = None
    runs: list[CrossEncoderRerankRun] = Field(default_factory=list)
    telemetry: StageTelemetry | None = None
    warnings: list[str] = Field(default_factory=list)
    reason: str | None = None
    lease_event: LeaseEvent | None = Field(None, description="Set when scoring held the GPU lease.")


def rerank_stage(config: RunConfig, collection: str, chunks: StageRef, fusion: FusionResult, key: str,
                 run_id: uuid.UUID | None = None, *, gpu: GpuLease | None = None) -> RerankStageResult:
    """CrossEncoder rerank of each real query's fused candidates.

    The model is loaded (and cast, and CUDA initialised) and the candidate texts
    read before the GPU lease is asked for; ``rerank.jsonl`` is written after it
    is released. A rerank model that cannot load is not fatal: the result says
    ``error`` and why.

    Args:
        gpu: A factory of the GPU lease context manager, entered only around scoring.
    """
    if not config.rerank.enabled:
        return seal(stage_dir(config, collection, "rerank", key), RerankStageResult(
            status="disabled", model_name=config.rerank.model, reason="disabled by rerank.enabled=false"))
    if fusion.status != "executed" or fusion.candidates is None:
        return seal(stage_dir(config, collection, "rerank", key), RerankStageResult(
            status="skipped", model_name=config.rerank.model, reason=fusion.reason or "fusion produced no candidates"))
    device = resolve_device(config.force_cpu)
    def load() -> RerankEncoder:
        resolved = resolve_model(config.rerank.model, "rerank", local_files_only=config.local_files_only)
        encoder = RerankEncoder(resolved, device, local_files_only=config.local_files_only,
                                precision=resolve_precision(config.rerank.precision, device))
        encoder.load()
        return encoder

    try:
        encoder, load_s = timed_load(load)
    except ModelUnavailableError as exc:
        return RerankStageResult(status="error", model_name=config.rerank.model, device=device, reason=str(exc),
                                 warnings=[f"rerank failed, the run continued without it: {exc}"])
    cuda_context_gb(device)  # CUDA starts before the lease: the slot is for GPU work
    queries = read_queries(config.queries_path) if config.queries_path else []
    method = config.fuse.method
    candidates = {q.query_id: q.fused[method] for q in query_lists(iter_jsonl_records(fusion.candidates.path))}
    wanted = {c.id for lst in candidates.values() for c in lst[: config.rerank.top_k_candidates]}
    texts = {i: t for table in iter_table_windows(chunks.path, config.stream.window, columns=["id", "text"])
             for i, t in zip(table["id"].to_pylist(), table["text"].to_pylist()) if i in wanted}

    def plan() -> TokenBudget:
        return plan_on_device(encoder.shape(), device, encoder.precision, config.gpu.memory_ceiling_gb,
                              cpu_items=max(1, config.gpu.cpu_batch_items // 2), policy=config.gpu.batch_policy)

    result = rerank(
        queries, candidates, texts, encoder, budget=plan, top_k_candidates=config.rerank.top_k_candidates,
        top_k=config.rerank.top_k, latency_budget_ms=config.rerank.latency_budget_ms,
        query_policy_mode=config.query_policy.mode, query_max_chars=config.query_policy.max_chars, run_id=run_id,
        window=config.stream.window, gpu=gpu,
    )
    path = stage_dir(config, collection, "rerank", key)
    ref = write_jsonl(path / "rerank.jsonl", (
        {"query_id": q.id, "model": encoder.name, "results": [c.model_dump() for c in result.results.get(q.id, [])]}
        for q in queries
    ))
    telemetry = result.telemetry.model_copy(update={"model_load_s": load_s}) if result.telemetry else None
    return seal(path, RerankStageResult(status="executed", model_name=encoder.name, device=device, results=ref,
                                        runs=result.runs, telemetry=telemetry, warnings=result.warnings,
                                        lease_event=result.lease_event))


def rerank_key(config: RunConfig, collection: str, chunks: StageRef, fusion: FusionResult) -> str:
    """Cache key of the rerank stage."""
    return stage_key(config, collection, "rerank", chunks.digest,
                     fusion.candidates.digest if fusion.candidates else fusion.reason,
                     model_fingerprint(config.rerank.model, "rerank", config.local_files_only))


def rerank_section(config: RunConfig, rerank_: RerankStageResult | None, error: str | None,
                   cached: bool) -> SummarySection:
    """``rerank_run``: per query what was reranked; a rerank that failed makes the run partial."""
    section = SummarySection()
    if rerank_ is not None:
        if rerank_.telemetry is not None:
            section.stages["rerank"] = rerank_.telemetry.model_copy(update={"cached": cached}).model_dump()
        section.warnings.extend(rerank_.warnings)
        run = RerankRun(
            enabled=config.rerank.enabled, executed=rerank_.status == "executed", status=rerank_.status,
            model_name=rerank_.model_name, device=rerank_.device, top_k_candidates=config.rerank.top_k_candidates,
            rerank_top_k=config.rerank.top_k,
            payload=[RerankPayload.model_validate(r.model_dump(mode="json")) for r in rerank_.runs],
            reason=rerank_.reason, cached=cached,
        )
    else:
        status: Status = "error" if error else "skipped"
        run = RerankRun(enabled=config.rerank.enabled, executed=False,
                        status=status if config.rerank.enabled else "disabled", model_name=config.rerank.model,
                        top_k_candidates=config.rerank.top_k_candidates, rerank_top_k=config.rerank.top_k,
                        reason=error or ("an earlier stage failed" if config.rerank.enabled
                                         else "disabled by rerank.enabled=false"))
    if run.enabled and not run.payload:
        section.warnings.append("rerank is enabled but the rerank_run payload is missing"
                                + (f": {run.reason}" if run.reason else ""))
    section.fields["rerank_run"] = run
    section.degraded = run.status == "error"
    return section
