"""The index stage: bring the collection's published index in line with this run's points."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from embedder.cancel import raise_if_stopped
from embedder.errors import StageError
from embedder.io.store import IndexLayout, IndexStatus, VectorStore
from embedder.io.writers import iter_chunk_windows, iter_dense_windows
from embedder.models.registry import get_spec
from embedder.schemas import SparseVector, StageRef, StageTelemetry
from embedder.settings import RunConfig
from embedder.stages.common import Status, SummarySection
from embedder.stages.dense import DenseStageResult
from embedder.stages.sparse import SparseStageResult
from embedder.summary import IndexIntegrity, IndexProof, IndexRun


class IndexResult(IndexRun):
    """What the index stage did, as ``index_run`` reports it."""

    status: Status


POINT_BATCH = 256
# Points read back from the index after each build (and on an unchanged run) and compared with the stored vectors.
PROOF_SAMPLE = 64
_DENSE_ATOL = 1e-4  # the engine stores cosine vectors normalised in float32
_SPARSE_RTOL = 1e-5


def iter_point_windows(chunks: StageRef, dense: DenseStageResult, sparse: SparseStageResult,
                       size: int) -> Iterator[tuple[list[Any], np.ndarray, dict[str, list[SparseVector | None]]]]:
    """The chunks, their dense vectors and each sparse model's vectors, a window at a time, checked to line up."""
    from embedder.stages.sparse import iter_sparse_windows

    dense_it = iter_dense_windows(dense.vectors.path, size)
    sparse_its = {o.vector_name: iter_sparse_windows(o.vectors, size) for o in sparse.outputs}
    for items in iter_chunk_windows(chunks.path, size):
        ids, vectors = next(dense_it, ([], None))
        if vectors is None or ids != [c.id for c in items]:
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

    for items, vectors, sparse_map in iter_point_windows(chunks, dense, sparse, config.stream.window):
        for start in range(0, len(items), batch):
            yield build_points(collection, items, vectors, sparse_map, start=start, stop=start + batch)


def index_layout(dense: DenseStageResult, sparse: SparseStageResult) -> IndexLayout:
    """The index layout: the dense dimension, and per sparse model its vector name and IDF flag (registry)."""
    return IndexLayout(dense.dim, tuple((o.vector_name, get_spec(o.model_name, "sparse").requires_idf)
                                        for o in sparse.outputs))


def index_stage(config: RunConfig, collection: str, chunks: StageRef, dense: DenseStageResult,
                sparse: SparseStageResult, store: VectorStore, run_path: str | Path | None = None, *,
                progress: Callable[[int, int], None] | None = None) -> IndexResult:
    """Bring the collection's published index in line with this run's points, and prove it holds them.

    The published index is trusted only after it passed its checks: its files
    against the checksums it was sealed with (a quick check, see
    :mod:`embedder.io.integrity`) and, when nothing changed, a sample of its
    points read back and compared with the stored vectors. A damaged or
    unreadable index is rebuilt from the stored vectors (nothing is embedded).

    Otherwise points are compared by digest with the published index: when
    nothing changed, nothing is written. Else new and changed points are
    upserted and, only after that succeeded, points whose chunks are gone are
    deleted. On Qdrant Edge the writes go into a copy of the published shard
    (or a new shard when the layout changed: another model or dimension), which
    is read back (a sample) and published atomically, so readers keep the old
    index until the new one is complete and proven.

    Args:
        store: Where the collection's index lives (Edge shards or a Qdrant server).
        run_path: The run set the new index belongs to (published with it); None publishes the index alone.
        progress: Called with ``(points written, points to write)`` after each batch.

    Raises:
        VectorIndexError: When the store cannot be reached or rejects the write.
        IndexLayoutError: When a server collection holds another layout.
        StageError: A freshly rebuilt index still reads back other vectors than were written.
    """
    from embedder.errors import IndexDamagedError
    from embedder.io.edge_store import legacy_index_note
    from embedder.io.qdrant import payload_for, point_batch, point_digest, point_id

    t0 = time.perf_counter()
    warnings = []
    if store.backend == "edge" and (note := legacy_index_note(config.output_dir, collection)):
        warnings.append(note)
    layout = index_layout(dense, sparse)
    integrity = IndexIntegrity()

    def distrust(file: str, reason: str) -> None:
        integrity.damaged.append({"file": file, "reason": reason})
        integrity.rebuilt = integrity.rebuilt or f"{Path(file).name}: {reason}"

    try:
        status = store.status(collection)
    except IndexDamagedError as exc:
        distrust(store.location(collection), str(exc))
        status = IndexStatus(exists=False, location=store.location(collection))
    report = store.verify(collection, "quick") if status.exists else None
    if report is not None:
        integrity.checked = report.files_checked
        for d in report.damaged:
            distrust(d.file, d.reason)
    previous: dict[str, str | None] = {}
    if status.exists and not integrity.damaged:
        try:
            previous = store.point_digests(collection)
        except IndexDamagedError as exc:
            distrust(status.location, str(exc))
    trusted = status.exists and not integrity.damaged
    window = config.stream.window

    def digest_of(i: int, items: list[Any], vectors: np.ndarray, sparse_map: dict[str, Any]) -> str:
        return point_digest(vectors[i], {n: v[i] for n, v in sparse_map.items()}, payload_for(items[i]))

    # Pass 1: which points are new or changed, which published points belong to chunks that are gone,
    # and a uniform sample of points (reservoir) to read back from the index.
    left = previous  # consumed in place: at a million points a copy of the map is tens of MB more
    changed: list[int] = []
    sample: list[tuple[str, np.ndarray, dict[str, SparseVector | None]]] = []
    rng = np.random.default_rng()
    n = 0
    for items, vectors, sparse_map in iter_point_windows(chunks, dense, sparse, window):
        for i, c in enumerate(items):
            pid = point_id(collection, c.id)
            if left.pop(pid, None) != digest_of(i, items, vectors, sparse_map):
                changed.append(n + i)
            slot = n + i if n + i < PROOF_SAMPLE else int(rng.integers(0, n + i + 1))
            if slot < PROOF_SAMPLE:
                entry = (pid, np.array(vectors[i], dtype=np.float32), {k: v[i] for k, v in sparse_map.items()})
                sample.append(entry) if len(sample) < PROOF_SAMPLE else sample.__setitem__(slot, entry)
        n += len(items)
    gone = list(left)
    del left, previous
    run_dir_ = Path(run_path) if run_path is not None else None
    if trusted and status.layout == layout and not changed and not gone:
        mismatched = _prove(store, collection, sample, None, integrity)
        if not mismatched:
            if run_dir_ is not None:
                store.keep_published(collection, run_dir_)
            elapsed = time.perf_counter() - t0
            return IndexResult(status="executed", action="unchanged", backend=store.backend,
                               location=status.location, points_count=status.points_count or 0, unchanged=n,
                               build_id=status.build_id, search_mode=None, latency_ms=elapsed * 1000,
                               integrity=integrity, batch_size=config.index.batch_size, collection=collection,
                               warnings=warnings)
        distrust(status.location, f"{mismatched} of {len(sample)} points read back from the index differ "
                                  "from the stored vectors")
        trusted = False

    for attempt in range(2):
        writer = store.writer(collection, layout, incremental=trusted, run_path=run_dir_, expected_points=n)
        todo = np.asarray(changed if writer.incremental else range(n), dtype=np.int64)
        upserted = deleted = 0
        try:
            # Pass 2: write the points pass 1 picked, window by window.
            start = 0
            for items, vectors, sparse_map in iter_point_windows(chunks, dense, sparse, window):
                stop = start + len(items)
                rows = (todo[np.searchsorted(todo, start):np.searchsorted(todo, stop)] - start).tolist()
                for b in range(0, len(rows), config.index.batch_size):
                    raise_if_stopped()
                    part = rows[b:b + config.index.batch_size]
                    digests = {r: digest_of(r, items, vectors, sparse_map) for r in part}
                    upserted += writer.upsert(point_batch(collection, items, vectors, sparse_map, part, digests))
                    if progress is not None:
                        progress(upserted, len(todo))
                start = stop
            if writer.incremental:  # a fresh index never held the gone points
                for b in range(0, len(gone), config.index.batch_size):
                    deleted += writer.delete(gone[b:b + config.index.batch_size])
            published = writer.publish()
        except BaseException:
            writer.abort()
            raise
        mismatched = _prove(store, collection, sample, published.build_id, integrity)
        if not mismatched:
            break
        reason = (f"{mismatched} of {len(sample)} points read back from the new index (build "
                  f"{published.build_id}) differ from the stored vectors")
        if not writer.incremental or attempt:
            raise StageError(f"{reason}, after a rebuild from nothing; the stored vectors or the disk are damaged")
        # The copy started from carried damage the quick check did not sample: build from nothing.
        distrust(published.location, reason)
        trusted = False
    rows_written = len(todo)
    elapsed = time.perf_counter() - t0
    if integrity.rebuilt:
        warnings.append(f"the published index was damaged ({integrity.rebuilt}); it was rebuilt from the stored "
                        f"vectors as build {published.build_id}")
    if published.points_count != n:
        warnings.append(f"the index holds {published.points_count} points but the collection has {n} "
                        "chunks; re-run to resynchronise")
    return IndexResult(
        status="executed", action="incremental" if writer.incremental else "rebuilt", backend=published.backend,
        location=published.location, points_count=published.points_count, upserted=upserted,
        deleted=deleted if writer.incremental else len(gone), unchanged=n - rows_written,
        latency_ms=elapsed * 1000, points_per_s=rows_written / elapsed if elapsed > 0 else 0.0,
        search_mode=published.search_mode, hnsw_build_s=published.hnsw_build_s, build_id=published.build_id,
        segments=published.segments, integrity=integrity, batch_size=config.index.batch_size,
        collection=collection, warnings=warnings)


def _prove(store: VectorStore, collection: str, sample: list[tuple[str, np.ndarray, dict[str, SparseVector | None]]],
           build_id: str | None, integrity: IndexIntegrity) -> int:
    """Read the sampled points back from the index; return how many differ from the stored vectors."""
    from embedder.errors import IndexDamagedError
    from embedder.io.store import DENSE_VECTOR

    if not sample:
        return 0
    try:
        got = store.vectors(collection, [pid for pid, _, _ in sample], build_id=build_id)
    except IndexDamagedError:
        return len(sample)
    bad = 0
    for pid, dense_row, sparse_row in sample:
        stored = got.get(pid)
        if stored is None or not _same_dense(stored.get(DENSE_VECTOR), dense_row) or any(
                not _same_sparse(stored.get(name), vec) for name, vec in sparse_row.items()):
            bad += 1
    integrity.proof = IndexProof(sampled=len(sample), mismatched=bad)
    return bad


def _same_dense(got: Any, want: np.ndarray) -> bool:
    if got is None:
        return False
    a = np.asarray(got, dtype=np.float32)
    norm = float(np.linalg.norm(want))
    if a.shape != want.shape or not np.isfinite(a).all() or norm == 0.0:
        return False
    return bool(np.allclose(a, want / norm, atol=_DENSE_ATOL))


def _same_sparse(got: SparseVector | None, want: SparseVector | None) -> bool:
    if want is None or not want.nnz:
        return got is None or not got.indices  # an empty vector is not stored
    if got is None:
        return False
    a = dict(zip(got.indices, got.values, strict=True))
    b = dict(zip(want.indices, want.values, strict=True))
    return a.keys() == b.keys() and all(np.isclose(a[k], b[k], rtol=_SPARSE_RTOL, atol=1e-7) for k in b)


def index_section(index: IndexResult | None, error: str | None, chunk_count: int) -> SummarySection:
    """``index_run``; a failed index fails the collection, a point count off ``chunk_count`` makes it partial."""
    if index is None:
        return SummarySection(fields={"index_run": IndexRun(status="error" if error else "skipped",
                                                            reason=error or "an earlier stage failed")},
                              failed=error is not None)
    telemetry = StageTelemetry(stage="index", items=index.upserted, latency_ms=index.latency_ms,
                               items_per_s=index.points_per_s, batch_size=index.batch_size)
    return SummarySection(fields={"index_run": IndexRun.model_validate(index.model_dump())},
                          stages={"index": telemetry.model_dump()},
                          warnings=list(index.warnings), degraded=index.points_count != chunk_count)
