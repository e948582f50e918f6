"""The pipeline's stages as plain functions over small file references.

Each stage reads its inputs from files named by :class:`StageRef`, writes its
outputs into the collection's ``.stages/`` directory under a name derived from
its cache key, and returns a small pydantic result. Prefect tasks wrap these
one-to-one; nothing here knows about Prefect.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

import embedder
from embedder.errors import ModelUnavailableError, StageError
from embedder.fusion import DenseIndex, SparseIndex, fuse_dbsf, fuse_rrf, retrieve_candidates
from embedder.gpu import apply_memory_ceiling, resolve_device
from embedder.io.atomic import file_digest
from embedder.io.load import LoadResult, load_collection
from embedder.io.readers import read_queries
from embedder.io.writers import (
    read_chunks,
    read_dense_parquet,
    read_jsonl_records,
    write_dense_parquet,
    write_jsonl,
)
from embedder.models.dense import DenseEncoder, default_dense_batch, embed_dense
from embedder.models.registry import get_spec, resolve_model
from embedder.models.rerank import RerankEncoder, default_rerank_batch, rerank
from embedder.models.sparse import infer_sparse, load_sparse_model
from embedder.schemas import (
    CrossEncoderRerankRun,
    ScoredCandidate,
    SparseInferenceRun,
    SparseVector,
    StageRef,
    StageTelemetry,
)
from embedder.settings import CollectionInput, RunConfig

Status = Literal["executed", "disabled", "skipped", "error"]


# Libraries whose releases can change a stage's output for the same input and model.
_OUTPUT_LIBRARIES = ("torch", "transformers", "sentence-transformers", "fastembed", "qdrant-client",
                     "qdrant-edge-py", "onnxruntime", "tokenizers", "numpy", "pyarrow")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The package version, a digest of the library's source and package data, and the output-shaping libraries.

    A change to any of them invalidates every cache key.
    """
    from importlib import metadata

    h = hashlib.sha256(embedder.__version__.encode())
    root = Path(embedder.__file__).parent
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and "__pycache__" not in rel.parts and path.suffix not in (".pyc", ".pyo"):
            h.update(rel.as_posix().encode())
            h.update(path.read_bytes())
    for name in _OUTPUT_LIBRARIES:
        try:
            h.update(f"{name}=={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{name}:absent".encode())
    return f"{embedder.__version__}+{h.hexdigest()[:12]}"


def stage_key(stage: str, *parts: Any) -> str:
    """A stable cache key for a stage: its name, the code version and its inputs."""
    payload = json.dumps([stage, code_version(), *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def collection_dir(config: RunConfig, collection: str) -> Path:
    """``<output_dir>/<collection>``; the name was validated by CollectionInput."""
    return Path(config.output_dir) / collection


def stages_dir(config: RunConfig, collection: str) -> Path:
    """Where stage outputs live: ``<output_dir>/<collection>/.stages`` (named by cache key)."""
    return collection_dir(config, collection) / ".stages"


def store_id(config: RunConfig, collection: str) -> str:
    """The identity of this collection's stage store, created on first use.

    Every cache key includes it, so a Prefect cache record only ever names files
    of this store: another output dir has another id, and a store that was
    deleted comes back with a new one, so no record can point at vanished files.
    """
    path = stages_dir(config, collection) / "STORE_ID"
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x", encoding="utf-8") as fh:  # exclusive: two racing runs agree on one id
            fh.write(uuid.uuid4().hex)
    except FileExistsError:
        pass
    return path.read_text(encoding="utf-8").strip()


def input_digest(path: str | Path) -> str:
    """Digest of an input file, or of a directory's chunk files (names and bytes)."""
    p = Path(path)
    if p.is_file():
        return file_digest(p)
    h = hashlib.sha256()
    for f in sorted(p.glob("*chunks*.json")):
        h.update(f.name.encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()


def queries_digest(config: RunConfig) -> str | None:
    """Digest of the query set, or None when the run has none."""
    return file_digest(config.queries_path) if config.queries_path else None


# --- load -------------------------------------------------------------------------------------


def load_stage(config: RunConfig, collection: CollectionInput, key: str) -> LoadResult:
    """Validate a collection into ``.stages/chunks-<key>.parquet`` plus ``rejects.jsonl``."""
    sdir = stages_dir(config, collection.name)
    return load_collection(
        collection.path, sdir / f"chunks-{key[:16]}.parquet", sdir / f"rejects-{key[:16]}.jsonl",
        max_chunk_chars=config.max_chunk_chars,
    )


# --- dense ------------------------------------------------------------------------------------


def dense_encoder(config: RunConfig, resolved: Any) -> Any:
    """The dense encoder for the configured backend (torch on the best device, or ONNX on the CPU)."""
    if config.dense_backend == "torch":
        return DenseEncoder(resolved, resolve_device(config.force_cpu), local_files_only=config.local_files_only)
    from embedder.models.onnx_dense import OnnxDenseEncoder

    return OnnxDenseEncoder(resolved, Path(config.output_dir) / ".onnx-cache", config.dense_backend)


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


def vector_space(config: RunConfig, kind: str, *parts: Any) -> str:
    """The id of a per-chunk vector space: the model's fingerprint, the settings that shape it, the code version."""
    payload = json.dumps([kind, code_version(), *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


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
        cache.append(list(missing), result.vectors)
        known.update(zip(missing, result.vectors))
        telemetry = result.telemetry
    chunk_digests = digests[: len(items)]
    computed = len({d for d in chunk_digests if d in missing})
    reused = len(items) - sum(1 for d in chunk_digests if d in missing)
    dim = int(next(iter(known.values())).shape[0]) if known else 0
    vectors = np.stack([known[d] for d in chunk_digests]) if items else np.zeros((0, dim), np.float32)
    sdir = stages_dir(config, collection)
    ref = write_dense_parquet(sdir / f"dense-{key[:16]}.parquet", [c.id for c in items], vectors, name)
    qref = None
    if config.queries_path:
        qvecs = (np.stack([known[d] for d in digests[len(items):]]) if queries
                 else np.zeros((0, dim), np.float32))
        qref = write_dense_parquet(sdir / f"dense-queries-{key[:16]}.parquet", [q.id for q in queries], qvecs, name)
    cache.compact(set(digests))
    elapsed = time.perf_counter() - t0
    telemetry = telemetry.model_copy(update={"items": computed, "reused": reused,
                                             "latency_ms": telemetry.latency_ms if missing else elapsed * 1000})
    return DenseStageResult(vectors=ref, query_vectors=qref, model_name=name, dim=dim, telemetry=telemetry,
                            computed=computed, reused=reused, lease_event=lease_event)


# --- sparse -----------------------------------------------------------------------------------


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


class SparseStageResult(BaseModel):
    """All sparse models' outputs."""

    status: Status
    outputs: list[SparseModelOutput] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    reason: str | None = None


def sparse_stage(config: RunConfig, collection: str, chunks: StageRef, key: str,
                 run_id: uuid.UUID | None = None) -> SparseStageResult:
    """Live sparse inference per model, CPU first, with the per-chunk metadata fallback.

    Live vectors are reused per chunk from ``.stages/vectors/<space>/`` when the
    same text and metadata met the same model (by content fingerprint) before; a
    model is loaded only when some chunk or query needs it.
    """
    from embedder.io.qdrant import sparse_vector_name
    from embedder.io.vector_cache import SparseVectorCache, text_digest
    from embedder.models.registry import BUNDLED_DATA

    if not config.enable_sparse:
        return SparseStageResult(status="disabled", reason="disabled by enable_sparse=false")
    items = read_chunks(chunks.path)
    queries = read_queries(config.queries_path) if config.queries_path else []
    sdir = stages_dir(config, collection)
    # The metadata decides the fallback vector, so it is part of a chunk's digest.
    digests = [text_digest(c.text + "\0" + json.dumps(c.metadata.get("sparse_features"), sort_keys=True))
               for c in items]
    outputs: list[SparseModelOutput] = []
    warnings: list[str] = []
    for name in config.sparse_models:
        spec = get_spec(name, "sparse")
        space = vector_space(config, "sparse", name, model_fingerprint(name, "sparse", config.local_files_only))
        cache = SparseVectorCache(sdir / "vectors" / space)
        stored = cache.lookup(digests)
        known = {i: stored[d] for i, d in enumerate(digests) if d in stored}
        model = None
        load_error = None
        if len(known) < len(items) or queries:
            try:
                resolved = resolve_model(name, "sparse", local_files_only=config.local_files_only)
                model = load_sparse_model(resolved, "cpu", local_files_only=config.local_files_only)
            except ModelUnavailableError as exc:
                load_error = str(exc)
        tag = f"{sparse_vector_name(name)}-{key[:16]}"
        result = infer_sparse(
            items, spec, model, queries=queries, load_error=load_error, bm25_dir=BUNDLED_DATA / "bm25",
            run_id=run_id, export_path=str(collection_dir(config, collection) / "sparse.jsonl"), known=known,
        )
        if model is not None:
            cache.append({digests[i]: v for i, (v, fb) in enumerate(zip(result.vectors, result.fallback))
                          if i not in known and v is not None and not fb})
        cache.compact(set(digests))
        ref = write_jsonl(sdir / f"{tag}.jsonl", (
            {"id": c.id, "sparse_vector": (v or SparseVector()).model_dump(), "model": name, "fallback": fb,
             "available": v is not None}
            for c, v, fb in zip(items, result.vectors, result.fallback)
        ))
        qref = None
        if queries:
            qref = write_jsonl(sdir / f"{tag}-queries.jsonl", (
                {"id": qid, "sparse_vector": v.model_dump()} for qid, v in result.query_vectors.items()
            ))
        warnings.extend(result.warnings)
        outputs.append(SparseModelOutput(
            model_name=name, vector_name=sparse_vector_name(name), vectors=ref, query_vectors=qref, run=result.run,
            available=sum(v is not None for v in result.vectors), telemetry=result.telemetry,
            warnings=result.warnings, computed=len(items) - len(known), reused=len(known),
        ))
    return SparseStageResult(status="executed", outputs=outputs, warnings=warnings)


def _read_sparse(ref: StageRef) -> tuple[list[str], list[SparseVector | None]]:
    ids, vecs = [], []
    for rec in read_jsonl_records(ref.path):
        ids.append(rec["id"])
        vecs.append(SparseVector(**rec["sparse_vector"]) if rec.get("available", True) else None)
    return ids, vecs


# --- index ------------------------------------------------------------------------------------


class IndexResult(BaseModel):
    """What the index stage did, as ``index_run`` reports it."""

    status: Status
    backend: str = "edge"
    location: str = ""
    collection: str = ""
    action: Literal["rebuilt", "incremental", "unchanged"] | None = Field(
        None, description="rebuilt: a new index from every point; incremental: only what changed was written; "
        "unchanged: the published index already held exactly these points.")
    points_count: int = Field(0, description="Points read back from the published index.")
    upserted: int = Field(0, description="New and changed points written.")
    deleted: int = Field(0, description="Points of chunks that are gone, removed after the upserts succeeded.")
    unchanged: int = Field(0, description="Points the published index already held as they are.")
    latency_ms: float = 0.0
    points_per_s: float = 0.0
    batch_size: int = 0
    search_mode: str | None = Field(None, description="exact (brute force), hnsw (graph built) or server.")
    hnsw_build_s: float = 0.0
    build_id: str | None = None
    warnings: list[str] = Field(default_factory=list)
    reason: str | None = None


POINT_BATCH = 256


def _load_point_inputs(chunks: StageRef, dense: DenseStageResult,
                       sparse: SparseStageResult) -> tuple[list[Any], Any, dict[str, list[SparseVector | None]]]:
    items = read_chunks(chunks.path)
    ids, vectors = read_dense_parquet(dense.vectors.path)
    if ids != [c.id for c in items]:
        raise StageError("dense vectors do not line up with the chunk table; re-run the dense stage")
    sparse_map = {o.vector_name: _read_sparse(o.vectors)[1] for o in sparse.outputs}
    return items, vectors, sparse_map


def iter_collection_points(config: RunConfig, collection: str, chunks: StageRef, dense: DenseStageResult,
                           sparse: SparseStageResult, batch: int = POINT_BATCH) -> Iterator[list[dict[str, Any]]]:
    """The ``qdrant.jsonl`` export rows of a collection, in batches.

    Rows are built a batch at a time: a row holds its vector as Python floats,
    so building all of them at once would cost ~30x the vectors' array size.
    """
    from embedder.io.qdrant import build_points

    items, vectors, sparse_map = _load_point_inputs(chunks, dense, sparse)
    for start in range(0, len(items), batch):
        yield build_points(collection, items, vectors, sparse_map, start=start, stop=start + batch)


def index_layout(dense: DenseStageResult, sparse: SparseStageResult) -> Any:
    """The index layout: the dense dimension, and per sparse model its vector name and IDF flag (registry)."""
    from embedder.io.store import IndexLayout

    return IndexLayout(dense.dim, tuple((o.vector_name, get_spec(o.model_name, "sparse").requires_idf)
                                        for o in sparse.outputs))


def index_stage(config: RunConfig, collection: str, chunks: StageRef, dense: DenseStageResult,
                sparse: SparseStageResult, store: Any, run_path: str | Path | None = None) -> IndexResult:
    """Bring the collection's published index in line with this run's points.

    Points are compared by digest with the published index: when nothing
    changed, nothing is written. Otherwise new and changed points are upserted
    and, only after that succeeded, points whose chunks are gone are deleted. On
    Qdrant Edge the writes go into a copy of the published shard (or a new
    shard when the layout changed: another model or dimension), which is
    published atomically, so readers keep the old index until the new one is
    complete.

    Args:
        store: A :class:`embedder.io.store.VectorStore`.
        run_path: The run set the new index belongs to (published with it); None publishes the index alone.

    Raises:
        VectorIndexError: When the store cannot be reached or rejects the write.
        IndexLayoutError: When a server collection holds another layout.
    """
    from embedder.io.edge_store import legacy_index_note
    from embedder.io.qdrant import payload_for, point_batch, point_digest, point_id

    t0 = time.perf_counter()
    warnings = []
    if store.backend == "edge" and (note := legacy_index_note(config.output_dir, collection)):
        warnings.append(note)
    items, vectors, sparse_map = _load_point_inputs(chunks, dense, sparse)
    layout = index_layout(dense, sparse)
    pids = [point_id(collection, c.id) for c in items]
    digests = [point_digest(vectors[i], {n: v[i] for n, v in sparse_map.items()}, payload_for(c))
               for i, c in enumerate(items)]
    status = store.status(collection)
    previous = store.point_digests(collection) if status.exists else {}
    current = dict(zip(pids, digests))
    gone = [p for p in previous if p not in current]
    common = dict(batch_size=config.index_batch_size, collection=collection, warnings=warnings)
    run_dir_ = Path(run_path) if run_path is not None else None
    if status.exists and status.layout == layout and previous == current:
        if run_dir_ is not None:
            store.keep_published(collection, run_dir_)
        elapsed = time.perf_counter() - t0
        return IndexResult(status="executed", action="unchanged", backend=store.backend, location=status.location,
                           points_count=status.points_count or 0, unchanged=len(pids), build_id=status.build_id,
                           search_mode=None, latency_ms=elapsed * 1000, **common)
    writer = store.writer(collection, layout, incremental=True, run_path=run_dir_)
    rows = [i for i, (p, d) in enumerate(current.items()) if not writer.incremental or previous.get(p) != d]
    upserted = deleted = 0
    try:
        for start in range(0, len(rows), config.index_batch_size):
            part = rows[start:start + config.index_batch_size]
            upserted += writer.upsert(point_batch(collection, items, vectors, sparse_map, part, digests))
        if writer.incremental:  # a fresh index never held the gone points
            for start in range(0, len(gone), config.index_batch_size):
                deleted += writer.delete(gone[start:start + config.index_batch_size])
        published = writer.publish()
    except BaseException:
        writer.abort()
        raise
    elapsed = time.perf_counter() - t0
    if published.points_count != len(items):
        warnings.append(f"the index holds {published.points_count} points but the collection has {len(items)} "
                        "chunks; re-run to resynchronise")
    return IndexResult(
        status="executed", action="incremental" if writer.incremental else "rebuilt", backend=published.backend,
        location=published.location, points_count=published.points_count, upserted=upserted,
        deleted=deleted if writer.incremental else len(gone), unchanged=len(items) - len(rows),
        latency_ms=elapsed * 1000, points_per_s=len(rows) / elapsed if elapsed > 0 else 0.0,
        search_mode=published.search_mode, hnsw_build_s=published.hnsw_build_s, build_id=published.build_id,
        **common)


# --- fusion -----------------------------------------------------------------------------------


class FusionResult(BaseModel):
    """Per-query candidate lists (dense, each sparse, RRF, DBSF), by reference."""

    status: Status
    method: str
    k: int | None = None
    queries: int = 0
    latency_ms: float = 0.0
    candidates: StageRef | None = None
    reason: str | None = None


def fuse_stage(config: RunConfig, collection: str, dense: DenseStageResult, sparse: SparseStageResult,
               key: str) -> FusionResult:
    """Retrieve dense and sparse candidates per real query and fuse them with RRF and DBSF."""
    if not config.queries_path or dense.query_vectors is None:
        return FusionResult(status="skipped", method=config.fusion, k=config.rrf_k,
                            reason="no query set was given (--queries); fusion never invents queries")
    t0 = time.perf_counter()
    ids, vectors = read_dense_parquet(dense.vectors.path)
    qids, qvecs = read_dense_parquet(dense.query_vectors.path)
    dense_index = DenseIndex(ids, vectors)
    sparse_indexes = []
    sparse_queries: list[dict[str, SparseVector]] = []
    for out in sparse.outputs:
        sids, svecs = _read_sparse(out.vectors)
        sparse_indexes.append(SparseIndex(sids, svecs, use_idf=get_spec(out.model_name, "sparse").requires_idf))
        sparse_queries.append({r["id"]: SparseVector(**r["sparse_vector"])
                               for r in read_jsonl_records(out.query_vectors.path)} if out.query_vectors else {})
    rows = []
    n = config.retrieval_top_n
    for qi, qid in enumerate(qids):
        sq = [m.get(qid, SparseVector()) for m in sparse_queries]
        lists = retrieve_candidates((qvecs[qi], sq), dense_index, sparse_indexes, n)
        rrf = fuse_rrf([[c.id for c in lst] for lst in lists], k=config.rrf_k)[:n]
        dbsf = fuse_dbsf(lists)[:n]
        rows.append({
            "query_id": qid,
            "dense": [c.model_dump() for c in lists[0]],
            "sparse": {o.model_name: [c.model_dump() for c in lst] for o, lst in zip(sparse.outputs, lists[1:])},
            "rrf": [c.model_dump() for c in rrf],
            "dbsf": [c.model_dump() for c in dbsf],
        })
    ref = write_jsonl(stages_dir(config, collection) / f"fused-{key[:16]}.jsonl", rows)
    return FusionResult(status="executed", method=config.fusion, k=config.rrf_k if config.fusion == "rrf" else None,
                        queries=len(rows), latency_ms=(time.perf_counter() - t0) * 1000, candidates=ref)


# --- rerank -----------------------------------------------------------------------------------


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
    lease_event: dict[str, Any] | None = Field(None, description="Set by the orchestrator that held the GPU lease.")


def rerank_stage(config: RunConfig, collection: str, chunks: StageRef, fusion: FusionResult, key: str,
                 run_id: uuid.UUID | None = None) -> RerankStageResult:
    """CrossEncoder rerank of each real query's fused candidates.

    A rerank model that cannot load is not fatal: the result says ``error`` and why.
    """
    if not config.enable_rerank:
        return RerankStageResult(status="disabled", model_name=config.rerank_model,
                                 reason="disabled by enable_rerank=false")
    if fusion.status != "executed" or fusion.candidates is None:
        return RerankStageResult(status="skipped", model_name=config.rerank_model,
                                 reason=fusion.reason or "fusion produced no candidates")
    device = resolve_device(config.force_cpu)
    try:
        resolved = resolve_model(config.rerank_model, "rerank", local_files_only=config.local_files_only)
        encoder = RerankEncoder(resolved, device, local_files_only=config.local_files_only)
        encoder.load()
    except ModelUnavailableError as exc:
        return RerankStageResult(status="error", model_name=config.rerank_model, device=device, reason=str(exc),
                                 warnings=[f"rerank failed, the run continued without it: {exc}"])
    apply_memory_ceiling(device, config.gpu_memory_ceiling_gb)
    queries = read_queries(config.queries_path) if config.queries_path else []
    rows = read_jsonl_records(fusion.candidates.path)
    fused_key = "rrf" if config.fusion == "rrf" else "dbsf"
    candidates = {r["query_id"]: [ScoredCandidate(**c) for c in r[fused_key]] for r in rows}
    wanted = {c.id for lst in candidates.values() for c in lst[: config.rerank_top_k_candidates]}
    texts = {c.id: c.text for c in read_chunks(chunks.path) if c.id in wanted}
    result = rerank(
        queries, candidates, texts, encoder, top_k_candidates=config.rerank_top_k_candidates,
        top_k=config.rerank_top_k, batch=default_rerank_batch(device, config.gpu_memory_ceiling_gb,
                                                               encoder.max_length),
        latency_budget_ms=config.rerank_latency_budget_ms, query_policy_mode=config.query_policy.mode,
        query_max_chars=config.query_policy.max_chars, run_id=run_id,
    )
    ref = write_jsonl(stages_dir(config, collection) / f"rerank-{key[:16]}.jsonl", (
        {"query_id": q.id, "model": encoder.name, "results": [c.model_dump() for c in result.results.get(q.id, [])]}
        for q in queries
    ))
    return RerankStageResult(status="executed", model_name=encoder.name, device=device, results=ref,
                             runs=result.runs, telemetry=result.telemetry, warnings=result.warnings)



# --- cache keys -------------------------------------------------------------------------------


def model_fingerprint(name: str, role: Literal["dense", "sparse", "rerank"], local_files_only: bool) -> str:
    """What a model's outputs depend on: a digest of its files when they are here, else its hub id.

    An unavailable model is part of a key too: a cached fallback result must not
    outlive the day the model becomes available.
    """
    from embedder.models.fingerprint import model_fingerprint as content_digest

    try:
        resolved = resolve_model(name, role, local_files_only=local_files_only)
    except Exception as exc:  # unknown or unavailable: the stage reports it
        return f"unavailable:{type(exc).__name__}"
    if resolved.is_local:
        return f"sha256:{content_digest(resolved.location)}"
    return f"hub:{resolved.location}"


def _owner(config: RunConfig, collection: str) -> list[str]:
    # Every key names the store its files live in: the output dir, the collection, the store's id.
    return [str(Path(config.output_dir).resolve()), collection, store_id(config, collection)]


def load_key(config: RunConfig, collection: CollectionInput) -> str:
    """Cache key of the load stage."""
    return stage_key("load", *_owner(config, collection.name), input_digest(collection.path), config.max_chunk_chars)


def dense_key(config: RunConfig, collection: str, chunks: StageRef) -> str:
    """Cache key of the dense stage."""
    return stage_key("dense", *_owner(config, collection), chunks.digest, config.dense_model, config.dense_backend,
                     queries_digest(config), config.force_cpu, config.gpu_memory_ceiling_gb,
                     model_fingerprint(config.dense_model, "dense", config.local_files_only))


def sparse_key(config: RunConfig, collection: str, chunks: StageRef) -> str:
    """Cache key of the sparse stage."""
    models = [(m, model_fingerprint(m, "sparse", config.local_files_only)) for m in config.sparse_models]
    return stage_key("sparse", *_owner(config, collection), chunks.digest, config.enable_sparse, models,
                     queries_digest(config))


def fuse_key(config: RunConfig, collection: str, dense: DenseStageResult, sparse: SparseStageResult) -> str:
    """Cache key of the fusion stage."""
    sparse_digests = [(o.model_name, o.vectors.digest, o.query_vectors.digest if o.query_vectors else None)
                      for o in sparse.outputs]
    return stage_key("fuse", *_owner(config, collection), dense.vectors.digest,
                     dense.query_vectors.digest if dense.query_vectors else None, sparse_digests,
                     config.retrieval_top_n, config.rrf_k, config.fusion)


def rerank_key(config: RunConfig, collection: str, chunks: StageRef, fusion: FusionResult) -> str:
    """Cache key of the rerank stage."""
    return stage_key("rerank", *_owner(config, collection), chunks.digest,
                     fusion.candidates.digest if fusion.candidates else fusion.reason,
                     config.enable_rerank, config.rerank_model, config.fusion, config.rerank_top_k_candidates,
                     config.rerank_top_k, config.rerank_latency_budget_ms, config.query_policy.model_dump(),
                     config.force_cpu, config.gpu_memory_ceiling_gb,
                     model_fingerprint(config.rerank_model, "rerank", config.local_files_only))
