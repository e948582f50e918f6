"""The dense stage: chunk (and query) vectors, reused per chunk text, computed under the GPU lease."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from embedder.batching import BatchPlan
from embedder.errors import StageError
from embedder.gpu import apply_memory_ceiling, resolve_device
from embedder.io.readers import read_queries
from embedder.io.writers import DenseParquetWriter, iter_chunk_texts, iter_table_windows, write_dense_parquet
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


def _merge_telemetry(parts: list[StageTelemetry], initial: int) -> StageTelemetry:
    """One dense telemetry row from the windows' rows: summed work, the last batch size, every back-off."""
    last = parts[-1]
    items = sum(t.items for t in parts)
    latency_ms = sum(t.latency_ms for t in parts)
    backoffs = [b for t in parts for b in t.backoffs]
    return last.model_copy(update={
        "items": items, "latency_ms": latency_ms, "initial_batch_size": initial, "backoffs": backoffs,
        "items_per_s": items / (latency_ms / 1000) if latency_ms > 0 else 0.0,
        "gpu_peak_gb": max(t.gpu_peak_gb for t in parts),
        "warnings": [f"dense batch backed off after OOM: {' -> '.join(map(str, backoffs + [last.batch_size]))}"]
        if backoffs else [],
    })


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

    The chunk table is streamed in windows of ``config.stream_window`` chunks:
    a first pass hashes the texts and finds which vectors the per-chunk store
    (``.stages/vectors/<space>/``) already holds (same text, same model by
    content fingerprint, backend and device); a second pass embeds the rest
    window by window and writes ``dense.parquet`` as it goes, so memory stays
    flat in the number of chunks. The model is not even loaded when nothing is
    left to embed.

    Args:
        gpu: A factory of the GPU lease context manager (yielding the lease event),
            entered only around the embedding pass.

    Raises:
        ModelUnavailableError: When the dense model cannot load (the run cannot continue).
    """
    from embedder.io.vector_cache import DenseVectorCache, digest_array, sorted_member, text_digest

    t0 = time.perf_counter()
    window = config.stream_window
    resolved = resolve_model(config.dense_model, "dense", local_files_only=config.local_files_only)
    device = "cpu" if config.dense_backend != "torch" else resolve_device(config.force_cpu)
    space = vector_space(config, "dense", model_fingerprint(config.dense_model, "dense", config.local_files_only),
                         config.dense_backend, device)
    cache = DenseVectorCache(stages_dir(config, collection) / "vectors" / space)
    index = cache.open_index()
    # Pass 1: a digest per chunk (64 bytes each, the only per-chunk state held) and what the store has.
    keys = np.concatenate([digest_array([text_digest(t) for t in texts])
                           for texts in iter_chunk_texts(chunks.path, window)] or [digest_array([])])
    n = len(keys)
    gids = index.find(keys)
    missing = gids < 0
    # Each missing text is embedded once (its first occurrence) and stored once. A text that recurs
    # in a later window keeps its first vector in memory until then: recomputing it in another batch
    # would give other float bits, and the index would see a changed point on the next run.
    first = np.zeros(n, dtype=bool)
    recurring = np.zeros(0, dtype=keys.dtype)
    if missing.any():
        pos = np.nonzero(missing)[0]
        uniq, first_at, counts = np.unique(keys[pos], return_index=True, return_counts=True)
        first[pos[first_at]] = True
        recurring = uniq[counts > 1]
    todo = int(first.sum())
    carried: dict[bytes, np.ndarray] = {}
    queries = read_queries(config.queries_path) if config.queries_path else []
    qtexts = [q.text for q in queries]
    qkeys = digest_array([text_digest(t) for t in qtexts])
    qgids = index.find(qkeys)
    name = resolved.spec.name
    encoder = None
    plan = None
    dim = 0
    if todo or (qgids < 0).any():
        encoder = dense_encoder(config, resolved)
        name = encoder.name
        apply_memory_ceiling(encoder.device, config.gpu_memory_ceiling_gb)
        max_len = int(getattr(encoder.load(), "max_seq_length", resolved.spec.max_length) or resolved.spec.max_length)
        plan = default_dense_batch(encoder.device, config.gpu_memory_ceiling_gb, max_len)
        dim = encoder.dim
    initial = plan.size if plan else 0
    parts: list[StageTelemetry] = []
    path = stage_dir(config, collection, "dense", key)
    writer = DenseParquetWriter(path / "dense.parquet", name)
    done = 0

    def embed(texts: list[str]) -> np.ndarray:
        nonlocal plan, done
        base = done
        result = embed_dense(texts, encoder, batch=plan,
                             progress=(lambda d, _t: progress(base + d, todo)) if progress else None)
        done += len(texts)
        parts.append(result.telemetry)
        # The next window starts where OOM back-off left this one.
        plan = BatchPlan(result.telemetry.batch_size or plan.size, plan.floor)
        return result.vectors

    lease = gpu() if gpu is not None and encoder is not None else contextlib.nullcontext()
    try:
        with lease as lease_event, cache.writer() as new_part:
            start = 0
            for table in iter_table_windows(chunks.path, window, columns=["id", "text"]):
                ids, texts = table["id"].to_pylist(), table["text"].to_pylist()
                stop = start + len(ids)
                wkeys, wgids = keys[start:stop], gids[start:stop]
                rows = index.fetch_known(wgids)
                miss = np.nonzero(first[start:stop])[0]
                fresh: dict[bytes, np.ndarray] = {}
                if len(miss):
                    vecs = embed([texts[i] for i in miss])
                    fresh = dict(zip(wkeys[miss].tolist(), vecs))
                    new_part.add([k.decode() for k in fresh], list(fresh.values()))
                    again = sorted_member(recurring, wkeys[miss])
                    carried.update((k, v) for (k, v), r in zip(fresh.items(), again) if r)
                # Every other missing text is a repeat: of a text embedded in this window, or carried.
                for i in np.nonzero(wgids < 0)[0]:
                    rows[i] = fresh[wkeys[i]] if wkeys[i] in fresh else carried[wkeys[i]]
                matrix = np.stack(rows)
                if dim and matrix.shape[1] != dim:
                    raise StageError(f"the vector store holds {matrix.shape[1]}-dim vectors for a {dim}-dim model; "
                                     "delete .stages/vectors and re-run")
                dim = int(matrix.shape[1])
                writer.write(ids, matrix)
                start = stop
            qrows = index.fetch_known(qgids)
            qmiss = np.nonzero(qgids < 0)[0]
            if len(qmiss):
                qvecs = embed([qtexts[i] for i in qmiss])
                for i, v in zip(qmiss, qvecs):
                    qrows[i] = v
                new_part.add([qkeys[i].decode() for i in qmiss], list(qvecs))
        ref = writer.close(dim)
    except BaseException:
        writer.abort()
        raise
    qref = None
    if config.queries_path:
        qvec = np.stack(qrows) if queries else np.zeros((0, max(dim, 1)), np.float32)
        qref = write_dense_parquet(path / "queries.parquet", [q.id for q in queries], qvec, name)
    cache.compact(np.unique(np.concatenate([keys, qkeys])))
    computed = int(first.sum())
    reused = int(n - missing.sum())
    elapsed = time.perf_counter() - t0
    telemetry = (_merge_telemetry(parts, initial) if parts
                 else StageTelemetry(stage="dense", model=name, device=device, latency_ms=elapsed * 1000))
    telemetry = telemetry.model_copy(update={"items": computed, "reused": reused})
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
