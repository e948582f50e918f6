"""The sparse stage: live vectors per sparse model (CPU first), with the per-chunk metadata fallback."""

from __future__ import annotations

import contextlib
import functools
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
from pydantic import BaseModel, Field

from embedder.errors import DamagedStoreError, ModelUnavailableError
from embedder.gpu import cuda_context_gb, resolve_device
from embedder.io.readers import read_queries
from embedder.io.vector_cache import text_digest
from embedder.io.writers import iter_chunk_windows, iter_jsonl_windows, iter_table_windows, write_jsonl
from embedder.lease import GpuLease, gpu_work
from embedder.models.engine import resolve_precision
from embedder.models.registry import get_spec, resolve_model
from embedder.models.sparse import SparseInference, load_sparse_model
from embedder.schemas import SparseInferenceRun, SparseVector, StageRef, StageTelemetry
from embedder.settings import RunConfig
from embedder.stages.common import (
    HEAL_ATTEMPTS,
    Status,
    StoreIntegrity,
    SummarySection,
    collection_dir,
    model_fingerprint,
    record_spaces,
    seal,
    stage_dir,
    stage_key,
    stages_dir,
    timed_load,
    touch_space,
    vector_space,
)
from embedder.summary import LeaseEvent, SparsePayload, SparseRun, SparseVectorsStats


class SparseModelOutput(BaseModel):
    """One sparse model's vectors, by reference, and its inference run."""

    model_name: str
    vector_name: str
    vectors: StageRef
    query_vectors: StageRef | None = None
    run: SparseInferenceRun
    available: int
    telemetry: StageTelemetry
    warnings: list[str] = Field(default_factory=list)
    computed: int = Field(0, description="Chunk vectors computed (live or fallback) by this run.")
    reused: int = Field(0, description="Live chunk vectors reused from earlier runs.")
    failed: int = Field(0, description="Chunks the live model did not embed: it failed on them, or did not load.")


class SparseStageResult(BaseModel):
    """All sparse models' outputs."""

    status: Status
    outputs: list[SparseModelOutput] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    reason: str | None = None
    lease_event: LeaseEvent | None = Field(None, description="Set when a model ran on the GPU, under the lease.")
    integrity: StoreIntegrity | None = Field(None, description="What the vector stores' checks found.")


def _load_model(config: RunConfig, name: str, device: str, precision: str) -> tuple[Any, str | None]:
    """The sparse model, or None and why it cannot load (the stage then falls back, it does not fail)."""
    try:
        resolved = resolve_model(name, "sparse", local_files_only=config.local_files_only)
        return load_sparse_model(resolved, device, local_files_only=config.local_files_only, precision=precision,
                                 ceiling_gb=config.gpu.memory_ceiling_gb,
                                 cpu_items=max(1, config.gpu.cpu_batch_items // 2),
                                 policy=config.gpu.batch_policy), None
    except ModelUnavailableError as exc:
        return None, str(exc)


def load_sparse_for(config: RunConfig, name: str, device: str) -> tuple[Any, str | None]:
    """The sparse model ``name`` loaded for ``device`` as this stage loads it, or None and why it cannot load."""
    return _load_model(config, name, device, resolve_precision(config.sparse.precision, device))


def sparse_key(config: RunConfig, collection: str, chunks: StageRef) -> str:
    """Cache key of the sparse stage: its settings, the chunks and each sparse model by its files."""
    models = [model_fingerprint(m, "sparse", config.local_files_only) for m in config.sparse.models]
    return stage_key(config, collection, "sparse", chunks.digest, models)


def sparse_stage(config: RunConfig, collection: str, chunks: StageRef, key: str,
                 run_id: uuid.UUID | None = None, *, gpu: GpuLease | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> SparseStageResult:
    """Live sparse inference per model, with the per-chunk metadata fallback.

    Each model runs where its registry entry prefers: BM25 on the CPU, SPLADE on
    the GPU when there is one (inside the GPU lease), else the CPU. Live
    vectors are reused per chunk from ``.stages/vectors/<space>/`` when the same
    text and metadata met the same model (by content fingerprint) before; a
    model is loaded only when some chunk or query needs it.

    Args:
        gpu: A factory of the GPU lease context manager, entered around inference on a GPU.
        progress: Called with ``(model, done, total)`` as each model's chunks are embedded.
    """
    from embedder.io.qdrant import sparse_vector_name
    from embedder.io.vector_cache import SparseVectorCache, digest_array
    from embedder.models.registry import BUNDLED_DATA

    path = stage_dir(config, collection, "sparse", key)
    if not config.sparse.enabled:
        return seal(path, SparseStageResult(status="disabled", reason="disabled by sparse.enabled=false"))
    window = config.stream.window
    queries = read_queries(config.queries_path) if config.queries_path else []

    keys = np.concatenate([digest_array([_chunk_digest(t, m) for t, m in zip(
        table["text"].to_pylist(), table["metadata"].to_pylist())])
        for table in iter_table_windows(chunks.path, window, columns=["text", "metadata"])] or [digest_array([])])
    outputs: list[SparseModelOutput] = []
    warnings: list[str] = []
    spaces: list[str] = []
    lease_event: LeaseEvent | None = None
    healed: list[dict[str, str]] = []
    checked = 0

    def device_of(name: str) -> str:
        # The registry's preference decides: BM25 stays on the CPU, SPLADE goes to the GPU when there is one.
        return resolve_device(config.force_cpu) if get_spec(name, "sparse").preferred_device == "cuda" else "cpu"

    def precision_of(name: str) -> str:
        return resolve_precision(config.sparse.precision, device_of(name))

    for name in config.sparse.models:
        spec = get_spec(name, "sparse")
        space = vector_space(config, "sparse", name, model_fingerprint(name, "sparse", config.local_files_only),
                             *((device_of(name), precision_of(name)) if spec.kind == "sparse-splade" else ()))
        spaces.append(space)
        for attempt in range(HEAL_ATTEMPTS):
            cache = SparseVectorCache(stages_dir(config, collection) / "vectors" / space)
            try:
                touch_space(cache.root)  # before reading it: a space in use is never old enough to be collected
                index = cache.open_index()
                gids = index.find(keys)
                reused = int((gids >= 0).sum())
                model: Any = None
                load_error: str | None = None
                load_s: float | None = None
                if reused < len(keys) or queries:
                    (model, load_error), load_s = timed_load(functools.partial(
                        _load_model, config, name, device_of(name), precision_of(name)))
                on_gpu = device_of(name).startswith("cuda") and gpu is not None and model is not None
                if on_gpu:
                    cuda_context_gb(device_of(name))  # CUDA starts before the lease: the slot is for GPU work
                inference = SparseInference(
                    spec, model, load_error=load_error, bm25_dir=BUNDLED_DATA / "bm25", total=len(keys),
                    todo=len(keys) - reused, batch_size=window if spec.kind == "sparse-splade" else 256,
                    progress=functools.partial(progress, name) if progress else None)
                tag = sparse_vector_name(name)

                placed: Callable[[], Any] | None = getattr(model, "placed", None)
                checkpoint_s = config.stream.vector_checkpoint_s
                with gpu_work(gpu, needed=on_gpu) as holding, \
                        (placed() if placed is not None else contextlib.nullcontext()), \
                        cache.writer(roll_after_s=checkpoint_s) as new_part:
                    ref = write_jsonl(path / f"{tag}.jsonl", _records(
                        chunks, window, keys, gids, index, inference, new_part if model is not None else None, name))
                    query_vectors = inference.queries(queries)
                    engine = getattr(model, "_engine", None)
                    if holding is not None and engine is not None:  # the engine counts device time itself
                        holding.gpu_work_s = round(engine.stats.device_s, 3)
                lease_event = (holding.event() if holding is not None else None) or lease_event
                run, telemetry, model_warnings = inference.finish(
                    run_id, str(collection_dir(config, collection) / "sparse.jsonl"))
                telemetry = telemetry.model_copy(update={"model_load_s": load_s})
                cache.compact(np.unique(keys))
                qref = None
                if queries:
                    qref = write_jsonl(path / f"{tag}-queries.jsonl", (
                        {"id": qid, "sparse_vector": v.model_dump()} for qid, v in query_vectors.items()
                    ))
                warnings.extend(model_warnings)
                outputs.append(SparseModelOutput(
                    model_name=name, vector_name=tag, vectors=ref, query_vectors=qref, run=run,
                    available=inference.available, telemetry=telemetry, warnings=model_warnings,
                    computed=len(keys) - reused, reused=reused, failed=inference.failed,
                ))
            except DamagedStoreError:
                # The part is quarantined: the model's pass begins again and embeds its vectors.
                healed += cache.quarantined
                if attempt == HEAL_ATTEMPTS - 1:
                    raise
                continue
            healed += cache.quarantined
            checked += cache.checked
            break
    record_spaces(path, spaces)
    result = SparseStageResult(status="executed", outputs=outputs, warnings=warnings, lease_event=lease_event,
                               integrity=StoreIntegrity(checked=checked, quarantined=healed))
    # Chunks the model failed on (or every chunk, when it did not load) are on the metadata fallback.
    # Such a result serves this run but is not sealed, so the next run retries the model on exactly
    # those chunks (every live vector is reused from the store) instead of being served the fallback.
    return result if any(o.failed for o in outputs) else seal(path, result)


def _chunk_digest(text: str, metadata_json: str) -> str:
    """A chunk's reuse key: its text and the ``sparse_features`` that decide its fallback vector.

    Other metadata does not change a sparse vector, so editing it reuses the
    vector. Most chunks carry no ``sparse_features``; their metadata is not parsed.
    """
    features = json.loads(metadata_json).get("sparse_features") if '"sparse_features"' in metadata_json else None
    return text_digest(text + "\0" + json.dumps(features, sort_keys=True))


def _records(chunks: StageRef, window: int, keys: np.ndarray, gids: np.ndarray, index: Any,
             inference: SparseInference, new_part: Any, name: str) -> Iterator[dict[str, Any]]:
    """The stage file's rows, a window at a time; live vectors computed here go into ``new_part``."""
    from embedder.io.vector_cache import sorted_member

    missing = gids < 0
    uniq, counts = np.unique(keys[missing], return_counts=True)
    recurring = uniq[counts > 1]
    # A live vector whose text recurs in a later window is carried there rather than recomputed
    # in another batch (other float bits would look like a changed point to the next run's index).
    carried: dict[bytes, SparseVector] = {}
    start = 0
    for chunk_window in iter_chunk_windows(chunks.path, window):
        stop = start + len(chunk_window)
        wgids, wkeys = gids[start:stop], keys[start:stop]
        known = {i: v for i, v in enumerate(index.fetch_known(wgids)) if v is not None}
        if carried:
            known.update((i, carried[k]) for i, k in enumerate(wkeys.tolist()) if k in carried)
        vectors, fallback = inference.window(chunk_window, known)
        fresh = [i for i, (v, fb) in enumerate(zip(vectors, fallback)) if i not in known and v is not None and not fb]
        if len(recurring):
            again = sorted_member(recurring, wkeys[fresh]) if fresh else np.zeros(0, dtype=bool)
            carried.update((wkeys[i].tobytes(), cast(SparseVector, vectors[i])) for i, r in zip(fresh, again) if r)
        if new_part is not None:
            new_part.add([wkeys[i].decode() for i in fresh], [vectors[i] for i in fresh])
        for c, v, fb in zip(chunk_window, vectors, fallback):
            # A plain dict: pydantic's model_dump per chunk costs more than the JSON encoding itself.
            yield {"id": c.id, "sparse_vector": {"indices": v.indices, "values": v.values} if v is not None
                   else {"indices": [], "values": []}, "model": name,
                   "fallback": fb, "available": v is not None}
        start = stop


def iter_sparse_windows(ref: StageRef, size: int) -> Iterator[tuple[list[str], list[SparseVector | None]]]:
    """A sparse stage file in windows of ``size``: chunk ids and their vectors (None where none was available)."""
    for records in iter_jsonl_windows(ref.path, size):
        yield ([r["id"] for r in records],
               [SparseVector.model_construct(**r["sparse_vector"]) if r.get("available", True) else None
                for r in records])


def sparse_section(config: RunConfig, sparse: SparseStageResult | None, error: str | None,
                   cached: bool) -> SummarySection:
    """``sparse_run``: per model what was computed, reused and how much fell back to metadata."""
    section = SummarySection()
    if sparse is not None and sparse.status == "executed":
        total = sum(o.vectors.items for o in sparse.outputs)
        available = sum(o.available for o in sparse.outputs)
        fallback_used = any(o.run.fallback_used for o in sparse.outputs)
        for o in sparse.outputs:
            name = "sparse" if len(sparse.outputs) == 1 else f"sparse:{o.model_name}"
            counts = {"items": 0, "reused": o.telemetry.reused + o.telemetry.items} if cached else {}
            section.stages[name] = o.telemetry.model_copy(update={"cached": cached, **counts}).model_dump()
        section.warnings.extend(sparse.warnings)
        if fallback_used:
            fb = sum(o.run.fallback_count for o in sparse.outputs)
            section.warnings.append(f"sparse metadata fallback used for {fb} chunk(s)")
        run = SparseRun(
            enabled=True, executed=True, status="executed", model_names=[o.model_name for o in sparse.outputs],
            fallback_used=fallback_used,
            vectors=SparseVectorsStats(total=total, available=available,
                                       coverage_ratio=available / total if total else 1.0),
            payload=SparsePayload.model_validate(sparse.outputs[0].run.model_dump(mode="json"))
            if sparse.outputs else None,
            payloads=[SparsePayload.model_validate(o.run.model_dump(mode="json")) for o in sparse.outputs[1:]],
            cached=cached,
            # Served from cache, this run computed nothing (as dense_run counts it).
            computed={o.model_name: 0 if cached else o.computed for o in sparse.outputs},
            reused={o.model_name: o.reused + (o.computed if cached else 0) for o in sparse.outputs},
        )
    elif sparse is not None:
        run = SparseRun(enabled=config.sparse.enabled, executed=False, status=sparse.status,
                        model_names=config.sparse.models, reason=sparse.reason)
    else:
        status: Status = "error" if error else "skipped"
        run = SparseRun(enabled=config.sparse.enabled, executed=False,
                        status=status if config.sparse.enabled else "disabled", model_names=config.sparse.models,
                        reason=error or ("an earlier stage failed" if config.sparse.enabled
                                         else "disabled by sparse.enabled=false"))
    if run.enabled and run.payload is None:
        section.warnings.append("sparse is enabled but the sparse_run payload is missing"
                                + (f": {run.reason}" if run.reason else ""))
    section.fields["sparse_run"] = run
    # A metadata fallback is a designed degradation (DESIGN.md): the run is partial, with its warning.
    section.degraded = run.status == "error" or run.fallback_used
    return section
