"""The dense stage: chunk (and query) vectors, reused per chunk text, computed under the GPU lease."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from embedder.gpu import apply_memory_ceiling, resolve_device
from embedder.io.readers import read_queries
from embedder.io.writers import read_chunks, write_dense_parquet
from embedder.models.dense import DenseEncoder, default_dense_batch, embed_dense
from embedder.models.registry import resolve_model
from embedder.schemas import StageRef, StageTelemetry
from embedder.settings import RunConfig
from embedder.stages.common import (
    SummarySection,
    model_fingerprint,
    owner_parts,
    queries_digest,
    seal,
    stage_dir,
    stage_key,
    stages_dir,
    vector_space,
)
from embedder.summary import DenseRun


class DenseStageResult(BaseModel):
    """Dense vectors for chunks (and queries), by reference."""

    vectors: StageRef
    query_vectors: StageRef | None = None
    model_name: str
    dim: int
    telemetry: StageTelemetry
    computed: int = Field(0, description="Chunk vectors computed by this run.")
    reused: int = Field(0, description="Chunk vectors taken from the per-chunk store (same text, same model).")
    lease_event: dict[str, Any] | None = Field(None, description="Set when the stage held the GPU lease.")


def dense_key(config: RunConfig, collection: str, chunks: StageRef) -> str:
    """Cache key of the dense stage."""
    return stage_key("dense", *owner_parts(config, collection), chunks.digest, config.dense_model,
                     config.dense_backend, queries_digest(config), config.force_cpu, config.gpu_memory_ceiling_gb,
                     model_fingerprint(config.dense_model, "dense", config.local_files_only))


def dense_encoder(config: RunConfig, resolved: Any) -> Any:
    """The dense encoder for the configured backend (torch on the best device, or ONNX on the CPU)."""
    if config.dense_backend == "torch":
        return DenseEncoder(resolved, resolve_device(config.force_cpu), local_files_only=config.local_files_only)
    from embedder.models.onnx_dense import OnnxDenseEncoder

    return OnnxDenseEncoder(resolved, Path(config.output_dir) / ".onnx-cache", config.dense_backend)


def dense_stage(
    config: RunConfig,
    collection: str,
    chunks: StageRef,
    key: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    gpu: Callable[[], Any] | None = None,
) -> DenseStageResult:
    """Embed the chunks (and queries) whose text has no vector yet, under the memory ceiling.

    Vectors are reused per chunk from ``.stages/vectors/<space>/`` when the same
    text was embedded before by the same model (by content fingerprint), backend
    and device; only the rest are computed, and the model is not even loaded
    when nothing is left.

    Args:
        gpu: A factory of the GPU lease context manager (yielding the lease event),
            entered only around the embedding itself.

    Raises:
        ModelUnavailableError: When the dense model cannot load (the run cannot continue).
    """
    from embedder.io.vector_cache import DenseVectorCache, text_digest

    t0 = time.perf_counter()
    resolved = resolve_model(config.dense_model, "dense", local_files_only=config.local_files_only)
    device = "cpu" if config.dense_backend != "torch" else resolve_device(config.force_cpu)
    space = vector_space(config, "dense", model_fingerprint(config.dense_model, "dense", config.local_files_only),
                         config.dense_backend, device)
    cache = DenseVectorCache(stages_dir(config, collection) / "vectors" / space)
    items = read_chunks(chunks.path)
    queries = read_queries(config.queries_path) if config.queries_path else []
    texts = [c.text for c in items] + [q.text for q in queries]
    digests = [text_digest(t) for t in texts]
    known = cache.lookup(digests)
    missing: dict[str, str] = {}
    for d, t in zip(digests, texts):
        if d not in known:
            missing.setdefault(d, t)
    lease_event = None
    name = resolved.spec.name
    telemetry = StageTelemetry(stage="dense", model=name, device=device)
    if missing:
        encoder = dense_encoder(config, resolved)
        name = encoder.name
        apply_memory_ceiling(encoder.device, config.gpu_memory_ceiling_gb)
        max_len = int(getattr(encoder.load(), "max_seq_length", resolved.spec.max_length) or resolved.spec.max_length)
        plan = default_dense_batch(encoder.device, config.gpu_memory_ceiling_gb, max_len)
        with (gpu() if gpu is not None else contextlib.nullcontext()) as lease_event:
            result = embed_dense(list(missing.values()), encoder, batch=plan, progress=progress)
        cache.append(dict(zip(missing, result.vectors)))
        known.update(zip(missing, result.vectors))
        telemetry = result.telemetry
    chunk_digests = digests[: len(items)]
    computed = len({d for d in chunk_digests if d in missing})
    reused = len(items) - sum(1 for d in chunk_digests if d in missing)
    dim = int(next(iter(known.values())).shape[0]) if known else 0
    vectors = np.stack([known[d] for d in chunk_digests]) if items else np.zeros((0, dim), np.float32)
    path = stage_dir(config, collection, "dense", key)
    ref = write_dense_parquet(path / "dense.parquet", [c.id for c in items], vectors, name)
    qref = None
    if config.queries_path:
        qvecs = (np.stack([known[d] for d in digests[len(items):]]) if queries
                 else np.zeros((0, dim), np.float32))
        qref = write_dense_parquet(path / "queries.parquet", [q.id for q in queries], qvecs, name)
    cache.compact(set(digests))
    elapsed = time.perf_counter() - t0
    telemetry = telemetry.model_copy(update={"items": computed, "reused": reused,
                                             "latency_ms": telemetry.latency_ms if missing else elapsed * 1000})
    return seal(path, DenseStageResult(vectors=ref, query_vectors=qref, model_name=name, dim=dim,
                                       telemetry=telemetry, computed=computed, reused=reused,
                                       lease_event=lease_event))


def dense_section(config: RunConfig, dense: DenseStageResult | None, error: str | None,
                  cached: bool) -> SummarySection:
    """``dense_run``: what was computed and reused; without dense vectors the collection failed."""
    if dense is None:
        run = DenseRun(model_name=config.dense_model, device="unknown", batch_size=0,
                       total_embeddings_generated=0, latency_ms=0.0, gpu_peak_gb=0.0, status="error",
                       reason=error or "an earlier stage failed") if error else None
        return SummarySection(fields={"dense_run": run}, failed=True)
    t = dense.telemetry
    run = DenseRun(model_name=dense.model_name, device=t.device, batch_size=t.batch_size or 0,
                   total_embeddings_generated=dense.computed, reused=dense.reused, latency_ms=t.latency_ms,
                   gpu_peak_gb=t.gpu_peak_gb, status="executed", initial_batch_size=t.initial_batch_size,
                   backoffs=t.backoffs, items_per_s=t.items_per_s, cached=cached)
    return SummarySection(fields={"dense_run": run},
                          stages={"dense": t.model_copy(update={"cached": cached}).model_dump()},
                          warnings=list(t.warnings))
