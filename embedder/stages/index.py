"""The index stage: bring the collection's published index in line with this run's points."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from embedder.cancel import raise_if_stopped
from embedder.errors import StageError
from embedder.io.writers import iter_chunk_windows, iter_dense_windows
from embedder.models.registry import get_spec
from embedder.schemas import SparseVector, StageRef, StageTelemetry
from embedder.settings import RunConfig
from embedder.stages.common import Status, SummarySection
from embedder.stages.dense import DenseStageResult
from embedder.stages.sparse import SparseStageResult


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
    segments: int | None = Field(None, description="Segments of the published index, where the store reports "
                                 "them (Edge builds a large shard's graph a segment at a time).")
    warnings: list[str] = Field(default_factory=list)
    reason: str | None = None


POINT_BATCH = 256


def iter_point_windows(chunks: StageRef, dense: DenseStageResult, sparse: SparseStageResult,
                       size: int) -> Iterator[tuple[list[Any], np.ndarray, dict[str, list[SparseVector | None]]]]:
    """The chunks, their dense vectors and each sparse model's vectors, a window at a time, checked to line up."""
    from embedder.stages.sparse import iter_sparse_windows

    dense_it = iter_dense_windows(dense.vectors.path, size)
    sparse_its = {o.vector_name: iter_sparse_windows(o.vectors, size) for o in sparse.outputs}
    for items in iter_chunk_windows(chunks.path, size):
        ids, vectors = next(dense_it, ([], None))
        if ids != [c.id for c in items]:
            raise StageError("dense vectors do not line up with the chunk table; re-run the dense stage")
        sparse_map = {}
        for name, it in sparse_its.items():
            sids, svecs = next(it, ([], []))
            if sids != ids:
                raise StageError(f"sparse vectors {name!r} do not line up with the chunk table; "
                                 "re-run the sparse stage")
            sparse_map[name] = svecs
        yield items, vectors, sparse_map
    if next(dense_it, None) is not None or any(next(it, None) is not None for it in sparse_its.values()):
        raise StageError("the vector files hold more rows than the chunk table; re-run the dense and sparse stages")


def iter_collection_points(config: RunConfig, collection: str, chunks: StageRef, dense: DenseStageResult,
                           sparse: SparseStageResult, batch: int = POINT_BATCH) -> Iterator[list[dict[str, Any]]]:
    """The ``qdrant.jsonl`` export rows of a collection, in batches.

    Rows are built a batch at a time: a row holds its vector as Python floats,
    so building all of them at once would cost ~30x the vectors' array size.
    """
    from embedder.io.qdrant import build_points

    for items, vectors, sparse_map in iter_point_windows(chunks, dense, sparse, config.stream_window):
        for start in range(0, len(items), batch):
            yield build_points(collection, items, vectors, sparse_map, start=start, stop=start + batch)


def index_layout(dense: DenseStageResult, sparse: SparseStageResult) -> Any:
    """The index layout: the dense dimension, and per sparse model its vector name and IDF flag (registry)."""
    from embedder.io.store import IndexLayout

    return IndexLayout(dense.dim, tuple((o.vector_name, get_spec(o.model_name, "sparse").requires_idf)
                                        for o in sparse.outputs))


def index_stage(config: RunConfig, collection: str, chunks: StageRef, dense: DenseStageResult,
                sparse: SparseStageResult, store: Any, run_path: str | Path | None = None, *,
                progress: Callable[[int, int], None] | None = None) -> IndexResult:
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
        progress: Called with ``(points written, points to write)`` after each batch.

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
    layout = index_layout(dense, sparse)
    status = store.status(collection)
    previous = store.point_digests(collection) if status.exists else {}
    window = config.stream_window

    def digest_of(i: int, items: list[Any], vectors: np.ndarray, sparse_map: dict[str, Any]) -> str:
        return point_digest(vectors[i], {n: v[i] for n, v in sparse_map.items()}, payload_for(items[i]))

    # Pass 1: which points are new or changed, and which published points belong to chunks that are gone.
    left = previous  # consumed in place: at a million points a copy of the map is tens of MB more
    changed: list[int] = []
    n = 0
    for items, vectors, sparse_map in iter_point_windows(chunks, dense, sparse, window):
        for i, c in enumerate(items):
            if left.pop(point_id(collection, c.id), None) != digest_of(i, items, vectors, sparse_map):
                changed.append(n + i)
        n += len(items)
    gone = list(left)
    del left, previous
    common = dict(batch_size=config.index_batch_size, collection=collection, warnings=warnings)
    run_dir_ = Path(run_path) if run_path is not None else None
    if status.exists and status.layout == layout and not changed and not gone:
        if run_dir_ is not None:
            store.keep_published(collection, run_dir_)
        elapsed = time.perf_counter() - t0
        return IndexResult(status="executed", action="unchanged", backend=store.backend, location=status.location,
                           points_count=status.points_count or 0, unchanged=n, build_id=status.build_id,
                           search_mode=None, latency_ms=elapsed * 1000, **common)
    writer = store.writer(collection, layout, incremental=True, run_path=run_dir_, expected_points=n)
    todo = np.asarray(changed if writer.incremental else range(n), dtype=np.int64)
    upserted = deleted = 0
    try:
        # Pass 2: write the points pass 1 picked, window by window.
        start = 0
        for items, vectors, sparse_map in iter_point_windows(chunks, dense, sparse, window):
            stop = start + len(items)
            rows = (todo[np.searchsorted(todo, start):np.searchsorted(todo, stop)] - start).tolist()
            for b in range(0, len(rows), config.index_batch_size):
                raise_if_stopped()
                part = rows[b:b + config.index_batch_size]
                digests = {r: digest_of(r, items, vectors, sparse_map) for r in part}
                upserted += writer.upsert(point_batch(collection, items, vectors, sparse_map, part, digests))
                if progress is not None:
                    progress(upserted, len(todo))
            start = stop
        if writer.incremental:  # a fresh index never held the gone points
            for b in range(0, len(gone), config.index_batch_size):
                deleted += writer.delete(gone[b:b + config.index_batch_size])
        published = writer.publish()
    except BaseException:
        writer.abort()
        raise
    rows_written = len(todo)
    elapsed = time.perf_counter() - t0
    if published.points_count != n:
        warnings.append(f"the index holds {published.points_count} points but the collection has {n} "
                        "chunks; re-run to resynchronise")
    return IndexResult(
        status="executed", action="incremental" if writer.incremental else "rebuilt", backend=published.backend,
        location=published.location, points_count=published.points_count, upserted=upserted,
        deleted=deleted if writer.incremental else len(gone), unchanged=n - rows_written,
        latency_ms=elapsed * 1000, points_per_s=rows_written / elapsed if elapsed > 0 else 0.0,
        search_mode=published.search_mode, hnsw_build_s=published.hnsw_build_s, build_id=published.build_id,
        segments=published.segments, **common)


def index_section(index: IndexResult | None, error: str | None, chunk_count: int) -> SummarySection:
    """``index_run``; a failed index fails the collection, a point count off ``chunk_count`` makes it partial."""
    if index is None:
        return SummarySection(fields={"index_run": {"status": "error" if error else "skipped",
                                                    "reason": error or "an earlier stage failed"}},
                              failed=error is not None)
    telemetry = StageTelemetry(stage="index", items=index.upserted, latency_ms=index.latency_ms,
                               items_per_s=index.points_per_s, batch_size=index.batch_size)
    return SummarySection(fields={"index_run": index.model_dump()}, stages={"index": telemetry.model_dump()},
                          warnings=list(index.warnings), degraded=index.points_count != chunk_count)
