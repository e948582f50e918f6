"""Qdrant Edge backend: immutable shards under the output dir, published by an atomic pointer switch.

Layout, per collection::

    <output_dir>/<collection>/index/shards/<build-id>/         one Edge shard per build; never changed once published
    <output_dir>/<collection>/index/shards/<build-id>.building present while a process builds that shard
    <output_dir>/<collection>/current/index.json               the published shard's id, layout and counts

``index.json`` belongs to the run set (:mod:`embedder.io.runset`): the shard is
published together with the exports and the summary by one switch of the
``current`` symlink.

Shards are created with the write-ahead log off: a shard with a WAL cannot be
opened by a second process (``Can't init WAL: WouldBlock``), while a flushed
WAL-less shard is opened and queried by any number of processes at once. So a
writer never touches a published shard; it builds a new one (from a copy of the
published one when the layout is the same), flushes it and names it in the next
run set. Readers open the published shard once per process, share the handle
across threads and notice a newer one on their next query.

Every shard is sealed with a checksum manifest (``<build-id>/checksums.json``, see
:mod:`embedder.io.integrity`) once it is flushed and settled; readers check it
(quickly) before they open the shard, and ``verify`` checks it in full.

Qdrant Edge opens a shard's files for writing even to search it. A reader whose
shard directory is read-only (permissions, a read-only mount shared by a fleet
of search services) opens a private copy instead, checked against the same
manifest, and says so (:attr:`EdgeStore.notes`).

This is the only module that imports ``qdrant_edge`` (pinned exactly: the API
is beta and moved between 0.6 and 0.9).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from embedder.errors import IndexDamagedError, IndexNotFoundError, VectorIndexError
from embedder.io.atomic import atomic_write_text, copy_sparse
from embedder.io.integrity import CheckReport, Damage, Depth, check_dir, describe, write_checksums
from embedder.io.runset import CURRENT, RUNS, publish_run, run_dir
from embedder.io.store import (
    DENSE_VECTOR,
    HybridQuery,
    IndexLayout,
    IndexStatus,
    PointBatch,
    PublishedIndex,
    SearchMode,
)
from embedder.procs import owner, owner_dead
from embedder.schemas import ScoredCandidate, SparseVector

log = logging.getLogger(__name__)

MANIFEST = "index.json"
SHARDS = "shards"
FORMAT = 1
# Exact search stays near 15 ms per hybrid query at 100k points on 2 cores, while an HNSW
# build there costs minutes (bench/index.py): below this, search exactly and skip the build.
DEFAULT_HNSW_MIN_POINTS = 100_000
# Segments above this size (KB) get an HNSW graph when optimize() runs; 0 disables indexing
# during the bulk load, so upserts never pay for graph maintenance.
_HNSW_INDEXING_THRESHOLD_KB = 1
# A shard that gets a graph is built a segment at a time: optimize() turns the appendable
# segment into an immutable, memory-mapped one each time it holds this many points. Optimising
# a segment holds it twice over (appendable and built) while its sparse index and graph are
# made, so one optimize() at the end cost ~4 KB per point of the whole shard (6.8 GB peak RSS
# at 1M points); a segment at a time bounds it by the segment (measured: a flat ~0.33 GB peak
# from 50k to 300k points, bench/scale.py for the whole run).
DEFAULT_SEGMENT_POINTS = 50_000
_MAX_SEGMENTS = 32


_FIX = "the next `embed-collections run` of the collection rebuilds it from the stored vectors"


def _writable_files(shard_dir: Path) -> bool:
    """Whether this process may write a shard's segment files (what Edge's load opens read-write)."""
    return all(os.access(p, os.W_OK) for p in shard_dir.glob("segments/*/payload_storage/*.dat"))


def index_root(output_dir: str | Path, collection: str) -> Path:
    """``<output_dir>/<collection>/index``: the collection's published shard and its builds."""
    return Path(output_dir) / collection / "index"


def legacy_index_dir(output_dir: str | Path, collection: str) -> Path | None:
    """The Qdrant local-mode folder an earlier version wrote (``<collection>/qdrant``), if present."""
    path = Path(output_dir) / collection / "qdrant"
    return path if path.is_dir() else None


def legacy_index_note(output_dir: str | Path, collection: str) -> str | None:
    """What to tell a user whose output dir holds an index from an earlier version, or None."""
    old = legacy_index_dir(output_dir, collection)
    if old is None:
        return None
    return (f"{old} holds a Qdrant local-mode index written by an earlier version; it is no longer read. "
            f"The next run (or this one) re-indexes {collection!r} into Qdrant Edge at "
            f"{index_root(output_dir, collection)}; delete {old} to reclaim its space")


def _edge() -> Any:
    try:
        import qdrant_edge
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise VectorIndexError("qdrant-edge-py is not installed; pip install 'qdrant-edge-py==0.9.0'") from exc
    return qdrant_edge


def _config(layout: IndexLayout, *, indexing_threshold_kb: int) -> Any:
    qe = _edge()
    # Cold: built segments stay memory-mapped and paged in by queries, never pinned in RAM, so a
    # shard's resident size follows what is searched rather than what is stored.
    cold = qe.Memory.Cold
    return qe.EdgeConfig(
        vectors={DENSE_VECTOR: qe.EdgeVectorParams(size=layout.dense_dim, distance=qe.Distance.Cosine, memory=cold)},
        sparse_vectors={name: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf if idf else None, memory=cold)
                        for name, idf in layout.sparse},
        payload_memory=cold,
        # Segment-at-a-time optimisation leaves many segments; merging them all back into one would
        # hold the whole shard twice again. Past this many, Qdrant merges the smallest (incremental
        # runs leave one small segment each), bounded by its max segment size.
        optimizers=qe.EdgeOptimizersConfig(indexing_threshold=indexing_threshold_kb,
                                           default_segment_number=_MAX_SEGMENTS),
        wal_enabled=False,
    )


def _edge_sparse(vec: SparseVector) -> Any:
    return _edge().SparseVector(list(vec.indices), [float(v) for v in vec.values])


def to_edge_request(query: HybridQuery, payload_fields: Sequence[str] = ("chunk_id",)) -> Any | None:
    """The Edge ``QueryRequest`` for a :class:`HybridQuery` (None when it searches no list)."""
    qe = _edge()
    lists = query.lists()
    if not lists:
        return None
    params = qe.SearchParams(exact=True) if query.exact else None

    def nearest(name: str, vec: Any) -> Any:
        value = _edge_sparse(vec) if isinstance(vec, SparseVector) else vec.tolist()
        return qe.Query.Nearest(value, using=name)

    if len(lists) == 1:
        return qe.QueryRequest(limit=query.limit, query=nearest(*lists[0]), params=params,
                               with_payload=list(payload_fields))
    prefetches = [qe.Prefetch(limit=query.prefetch_limit, query=nearest(n, v), params=params) for n, v in lists]
    # Qdrant scores RRF as 1 / (k + position) with 0-based positions; embedder.fusion uses the
    # standard 1 / (k + rank) with 1-based ranks. k + 1 makes the two agree exactly.
    fusion = (qe.Fusion.Rrf(k=query.k + 1, weights=query.list_weights())
              if query.fusion == "rrf" else qe.Fusion.Dbsf())
    return qe.QueryRequest(limit=query.limit, prefetches=prefetches, query=fusion, with_payload=list(payload_fields))


class EdgeIndexWriter:
    """Builds one new shard; :meth:`publish` switches the collection's pointer to it."""

    def __init__(self, store: EdgeStore, collection: str, layout: IndexLayout, *, incremental: bool = True,
                 run_path: Path | None = None, expected_points: int | None = None) -> None:
        self.store = store
        self.collection = collection
        self.layout = layout
        self.run_path = run_path
        self.root = index_root(store.root, collection)
        shards = self.root / SHARDS
        shards.mkdir(parents=True, exist_ok=True)
        self.build_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        self.path = shards / self.build_id
        # The marker exists before the shard does, so a concurrent publisher's clean-up never
        # mistakes this build for an abandoned one.
        self.marker = shards / f"{self.build_id}.building"
        self.marker.write_text(json.dumps({**owner(), "started_at": time.time()}), encoding="utf-8")
        try:
            published = store.manifest(collection)
        except IndexDamagedError:  # nothing to start from: build from nothing
            published = None
        base = self.root / SHARDS / published["shard"] if published else None
        # Same layout: start from a copy of the published shard and write only what changed.
        # The published shard itself is never opened for writing; readers keep using it.
        self.incremental = bool(incremental and published is not None and base is not None and base.is_dir()
                                and IndexLayout.from_json(published["layout"]) == layout)
        # Known to end up with a graph: build it a segment at a time while writing (see
        # DEFAULT_SEGMENT_POINTS); otherwise decide at publish, from the count.
        self._segmented = expected_points is not None and expected_points >= store.hnsw_min_points
        self._pending = 0
        threshold = _HNSW_INDEXING_THRESHOLD_KB if self._segmented else 0
        config = _config(layout, indexing_threshold_kb=threshold)
        try:
            if self.incremental and base is not None:
                shutil.copytree(base, self.path, copy_function=copy_sparse)
                self._shard: Any = _edge().EdgeShard.load(str(self.path), config)
            else:
                self._shard = _edge().EdgeShard.create(str(self.path), config)
        except Exception as exc:
            shutil.rmtree(self.path, ignore_errors=True)
            self.marker.unlink(missing_ok=True)
            raise VectorIndexError(f"cannot create a Qdrant Edge shard at {self.path}: {exc}") from exc
        self._done = False
        self._hnsw_s = 0.0

    def upsert(self, batch: PointBatch) -> int:
        """Write a batch of points into the unpublished shard."""
        qe = _edge()
        points = []
        for i, pid in enumerate(batch.point_ids):
            vector: dict[str, Any] = {DENSE_VECTOR: batch.dense[i]}
            for name, vecs in batch.sparse.items():
                v = vecs[i]
                if v is not None and v.nnz:
                    vector[name] = _edge_sparse(v)
            points.append(qe.Point(pid, vector, batch.payloads[i]))
        try:
            self._shard.update(qe.UpdateOperation.upsert_points(points))
        except Exception as exc:
            raise VectorIndexError(f"Qdrant Edge rejected a batch for {self.collection!r}: {exc}") from exc
        self._pending += len(points)
        if self._segmented and self._pending >= self.store.segment_points:
            self._optimize()
        return len(points)

    def _optimize(self) -> None:
        """Seal the appendable segment: it becomes an immutable segment with its graph and sparse index."""
        t0 = time.perf_counter()
        self._shard.flush()
        self._shard.optimize()
        self._shard.flush()
        self._hnsw_s += time.perf_counter() - t0
        self._pending = 0

    def delete(self, point_ids: Sequence[str]) -> int:
        """Remove points from the unpublished shard."""
        if not point_ids:
            return 0
        try:
            self._shard.update(_edge().UpdateOperation.delete_points(list(point_ids)))
        except Exception as exc:
            raise VectorIndexError(f"Qdrant Edge could not delete points of {self.collection!r}: {exc}") from exc
        return len(point_ids)

    def publish(self) -> PublishedIndex:
        """Flush, build HNSW when the shard is big enough, then name the shard in the run set's ``index.json``."""
        qe = _edge()
        self._shard.flush()
        count = int(self._shard.count(qe.CountRequest(exact=True)))
        mode: SearchMode = "exact"
        if count >= self.store.hnsw_min_points:
            if not self._segmented:  # the count was not known up front: reopen with indexing on
                self._shard.close()
                self._shard = qe.EdgeShard.load(
                    str(self.path), _config(self.layout, indexing_threshold_kb=_HNSW_INDEXING_THRESHOLD_KB))
            # Deletes and the last partial segment; an incremental copy indexes only what it appended.
            self._optimize()
            mode = "hnsw"
        hnsw_s = self._hnsw_s
        segments = int(self._shard.info().segments_count)
        self._shard.close()
        # The first load after a build rewrites the shard's config and drops its tracker journal;
        # after that, loading and searching leave every file as it is. Settle it before sealing.
        qe.EdgeShard.load(str(self.path)).close()
        write_checksums(self.path)
        try:
            previous = self.store.manifest(self.collection)
        except IndexDamagedError:
            previous = None
        manifest = {
            "format": FORMAT, "backend": "edge", "collection": self.collection, "shard": self.build_id,
            "previous": previous.get("shard") if previous else None, "layout": self.layout.to_json(),
            "points_count": count, "search_mode": mode, "hnsw_build_s": round(hnsw_s, 3), "segments": segments,
            "built_at": datetime.now(UTC).isoformat(),
        }
        self.store.write_manifest(self.collection, manifest, self.run_path)
        self.marker.unlink(missing_ok=True)
        self._done = True
        return PublishedIndex(backend="edge", location=str(self.path), collection=self.collection,
                              points_count=count, search_mode=mode, hnsw_build_s=hnsw_s, build_id=self.build_id,
                              segments=segments)

    def abort(self) -> None:
        """Remove the unpublished shard; the published one is untouched."""
        if self._done:
            return
        self._done = True
        try:
            self._shard.close()
        except Exception:  # already closed by a failed publish
            pass
        shutil.rmtree(self.path, ignore_errors=True)
        self.marker.unlink(missing_ok=True)


class EdgeStore:
    """Qdrant Edge shards under an output dir; read handles are opened once per shard per process.

    Readers pass ``run_set`` (a resolved run-set directory) to read the index
    that set names: a search that took its query model from one published set
    then searches that set's shard, even when a run publishes another meanwhile.
    Without it, the collection's ``current`` set is read.

    Attributes:
        notes: Collection -> what a reader should be told about how its shard was opened
            (a private copy of a read-only shard).
    """

    backend = "edge"

    def __init__(self, output_dir: str | Path, *, hnsw_min_points: int = DEFAULT_HNSW_MIN_POINTS,
                 segment_points: int = DEFAULT_SEGMENT_POINTS) -> None:
        self.root = Path(output_dir)
        self.hnsw_min_points = hnsw_min_points
        self.segment_points = segment_points
        # Shard directory -> open handle; a collection keeps its two newest (a switch in progress).
        self._handles: dict[str, tuple[str, Any]] = {}
        self._copies: dict[str, Path] = {}
        self.notes: dict[str, str] = {}
        self._lock = threading.Lock()

    def location(self, collection: str) -> str:
        """The collection's index directory."""
        return str(index_root(self.root, collection))

    def _manifest_path(self, collection: str, run_set: Path | None = None) -> Path:
        return (run_set if run_set is not None else self.root / collection / CURRENT) / MANIFEST

    def manifest(self, collection: str, run_set: Path | None = None) -> dict[str, Any] | None:
        """The published manifest (``current/index.json``, or ``run_set``'s), or None when there is none.

        Raises:
            IndexDamagedError: The manifest is unreadable.
        """
        path = self._manifest_path(collection, run_set)
        try:
            data = json.loads(path.read_bytes())
            IndexLayout.from_json(data["layout"])
            str(data["shard"])
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexDamagedError(f"the index manifest {path} of collection {collection!r} is unreadable "
                                    f"({type(exc).__name__}: {exc}); {_FIX}") from exc
        return data

    def shard_dir(self, collection: str, run_set: Path | None = None) -> Path | None:
        """The directory of the shard a set names (default: the published one), or None when none is named."""
        manifest = self.manifest(collection, run_set)
        return None if manifest is None else index_root(self.root, collection) / SHARDS / manifest["shard"]

    def write_manifest(self, collection: str, manifest: dict[str, Any], run_path: Path | None) -> None:
        """Name a shard in a run set; with no run set, publish a set that holds only the index.

        In a pipeline run the caller publishes the set (exports, summary and this
        manifest) with one switch; a library caller that builds only an index gets
        it published here.
        """
        if run_path is not None:
            atomic_write_text(run_path / MANIFEST, json.dumps(manifest, indent=2))
            return
        path = run_dir(self.root, collection, f"index-{manifest['shard']}")
        atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=2))
        publish_run(self.root, collection, path)
        self.collect_garbage(collection)

    def keep_published(self, collection: str, run_path: Path) -> None:
        """Carry the published index into a new run set unchanged (nothing to re-index)."""
        manifest = self.manifest(collection)
        if manifest is not None:
            atomic_write_text(run_path / MANIFEST, json.dumps(manifest, indent=2))

    def status(self, collection: str, run_set: Path | None = None) -> IndexStatus:
        """The published index (or the one ``run_set`` names), or the reason there is none.

        Raises:
            IndexDamagedError: The manifest naming the index is unreadable.
        """
        manifest = self.manifest(collection, run_set)
        location = self.location(collection)
        if manifest is None:
            reason = legacy_index_note(self.root, collection) or (
                f"no index has been published for collection {collection!r} under {self.root}; "
                "run `embed-collections run` for it first")
            return IndexStatus(exists=False, location=location, reason=reason)
        return IndexStatus(exists=True, location=location, layout=IndexLayout.from_json(manifest["layout"]),
                           points_count=int(manifest["points_count"]), build_id=manifest["shard"])

    def verify(self, collection: str, depth: Depth = "quick") -> CheckReport | None:
        """Check the published shard against the checksums it was sealed with.

        Returns:
            What the check found (a missing shard or an unreadable manifest is damage),
            or None when nothing is published or the shard was sealed without checksums.
        """
        try:
            shard = self.shard_dir(collection)
        except IndexDamagedError as exc:
            return CheckReport(files_checked=1, damaged=[Damage(str(self._manifest_path(collection)), str(exc))])
        if shard is None:
            return None
        if not shard.is_dir():
            return CheckReport(files_checked=1, damaged=[Damage(str(shard), "the shard directory is missing")])
        return check_dir(shard, depth)

    def writer(self, collection: str, layout: IndexLayout, *, incremental: bool = True,
               run_path: Path | None = None, expected_points: int | None = None) -> EdgeIndexWriter:
        """A writer for a new shard: a copy of the published one when the layout matches, else empty.

        Any layout is fine: a new layout (another model, another dimension) builds
        a new shard and replaces the old one only when it is published.

        Args:
            incremental: Start from the published shard; False builds from nothing (a damaged shard).
            expected_points: The shard's final point count, when known: at or above
                ``hnsw_min_points`` the graph is built a segment at a time while writing,
                which bounds the build's memory by the segment instead of the shard.
        """
        return EdgeIndexWriter(self, collection, layout, incremental=incremental, run_path=run_path,
                               expected_points=expected_points)

    def point_digests(self, collection: str) -> dict[str, str | None]:
        """Point id -> ``point_digest`` payload over the published shard."""
        if self.manifest(collection) is None:
            return {}
        qe = _edge()
        shard = self._shard(collection)
        out: dict[str, str | None] = {}
        offset = None
        while True:
            try:
                records, offset = shard.scroll(qe.ScrollRequest(offset=offset, limit=10_000,
                                                                with_payload=["point_digest"], with_vector=False))
            except Exception as exc:
                raise IndexDamagedError(f"the published shard of {collection!r} cannot be read: {exc}; "
                                        f"{_FIX}") from exc
            for r in records:
                out[str(r.id)] = (r.payload or {}).get("point_digest")
            if offset is None or not records:
                return out

    def vectors(self, collection: str, point_ids: Sequence[str],
                build_id: str | None = None) -> dict[str, dict[str, Any]]:
        """The stored vectors of points (point id -> vector name -> dense list or SparseVector).

        Args:
            build_id: The shard to read (default: the published one), e.g. one just built.
        """
        if not point_ids:
            return {}
        if build_id is None:
            shard = self._shard(collection)
        else:
            shard = self._load(collection, index_root(self.root, collection) / SHARDS / build_id)
        try:
            records = shard.retrieve(list(point_ids), False, True)
        except Exception as exc:
            raise IndexDamagedError(f"the shard {build_id or 'published'} of {collection!r} cannot be read: "
                                    f"{exc}; {_FIX}") from exc
        out = {}
        for r in records:
            out[str(r.id)] = {name: (SparseVector(indices=list(v.indices), values=list(v.values))
                                     if hasattr(v, "indices") else v) for name, v in (r.vector or {}).items()}
        return out

    def _shard(self, collection: str, run_set: Path | None = None) -> Any:
        """The open handle of the shard the set names (default: the published set)."""
        last_error: Exception | None = None
        shard_dir: Path | None = None
        for _attempt in range(3):
            shard_dir = self.shard_dir(collection, run_set)
            if shard_dir is None:
                raise IndexNotFoundError(self.status(collection).reason)
            try:
                return self._load(collection, shard_dir)
            except IndexDamagedError as exc:
                # A newer publish may have cleaned this shard up between our read and load.
                last_error = exc
                if shard_dir.is_dir():
                    raise
        assert shard_dir is not None
        if not shard_dir.is_dir():
            # The manifest is stable across our attempts and its shard is gone: the
            # output dir was edited by hand or copied without its index.
            raise IndexDamagedError(
                f"the published index of collection {collection!r} names shard {shard_dir.name!r}, "
                f"which is missing from {shard_dir.parent}; {_FIX}")
        raise IndexDamagedError(f"cannot open the published Qdrant Edge shard of {collection!r}: {last_error}")

    def _load(self, collection: str, shard_dir: Path) -> Any:
        """Open a shard once per process: checked against its checksums first, copied when read-only."""
        key = str(shard_dir)
        with self._lock:
            held = self._handles.get(key)
            if held is not None:
                return held[1]
            if not shard_dir.is_dir():
                raise IndexDamagedError(f"shard {shard_dir} is missing")
            try:
                report = check_dir(shard_dir, "quick")
            except PermissionError as exc:
                raise VectorIndexError(f"this process may not read the index of {collection!r} ({exc}); a search "
                                       "needs read access to the output dir and its files") from None
            if report is not None and not report.ok:
                raise IndexDamagedError(
                    f"the published index of collection {collection!r} is damaged "
                    f"({describe(report.damaged)}); nothing is served from it; {_FIX}")
            where = shard_dir
            if not os.access(shard_dir, os.W_OK) or not _writable_files(shard_dir):
                where = self._private_copy(collection, shard_dir)
            try:
                shard = _edge().EdgeShard.load(str(where))
            except Exception as exc:
                raise IndexDamagedError(f"the published shard {shard_dir.name} of collection {collection!r} "
                                        f"cannot be opened ({exc}); {_FIX}") from exc
            # A collection keeps its two newest handles; an older one closes when its last query drops it.
            mine = [k for k, (c, _h) in self._handles.items() if c == collection]
            for old in mine[:-1]:
                self._handles.pop(old, None)
                self._drop_copy(old)
            self._handles[key] = (collection, shard)
            return shard

    def _private_copy(self, collection: str, shard_dir: Path) -> Path:
        """Copy a read-only shard where this process may write (Edge opens its files read-write)."""
        base = os.environ.get("EMBEDDER_SHARD_COPY_DIR") or None
        dest = Path(tempfile.mkdtemp(prefix=f"embedder-{collection}-{shard_dir.name}-", dir=base))
        shutil.copytree(shard_dir, dest, dirs_exist_ok=True, copy_function=copy_sparse)
        for path in [dest, *dest.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
        report = check_dir(dest, "full")
        if report is not None and not report.ok:
            shutil.rmtree(dest, ignore_errors=True)
            raise IndexDamagedError(f"the copy of read-only shard {shard_dir} is damaged "
                                    f"({describe(report.damaged)}); {_FIX}")
        self._copies[str(shard_dir)] = dest
        note = (f"the index of {collection!r} lies in read-only storage ({shard_dir}); Qdrant Edge opens its files "
                f"for writing, so this process searches a private copy at {dest}")
        self.notes[collection] = note
        log.warning(note)
        return dest

    def _drop_copy(self, key: str) -> None:
        copy = self._copies.pop(key, None)
        if copy is not None:
            shutil.rmtree(copy, ignore_errors=True)

    def query(self, collection: str, query: HybridQuery, run_set: Path | None = None) -> list[ScoredCandidate]:
        """Search the published shard (or the one ``run_set`` names)."""
        request = to_edge_request(query)
        if request is None:
            return []
        try:
            points = self._shard(collection, run_set).query(request)
        except VectorIndexError:
            raise
        except Exception as exc:
            raise IndexDamagedError(f"the published shard of {collection!r} failed a search ({exc}); "
                                    f"{_FIX}") from exc
        return [ScoredCandidate(id=p.payload["chunk_id"], score=float(p.score)) for p in points]

    def payloads(self, collection: str, point_ids: Sequence[str],
                 run_set: Path | None = None) -> dict[str, dict[str, Any]]:
        """Payloads of the given points, keyed by point id."""
        if not point_ids:
            return {}
        try:
            records = self._shard(collection, run_set).retrieve(list(point_ids), True, False)
        except VectorIndexError:
            raise
        except Exception as exc:
            raise IndexDamagedError(f"the published shard of {collection!r} failed a read ({exc}); "
                                    f"{_FIX}") from exc
        return {str(r.id): dict(r.payload or {}) for r in records}

    def collect_garbage(self, collection: str) -> list[str]:
        """Delete shards that no run set names and that no live process is building; return their ids.

        Run sets keep the published set and the one before it (see
        :func:`embedder.io.runset.collect_runs`), so a reader that loaded the
        previous shard just before a switch finishes its query; readers move to the
        new shard on their next query.
        """
        runs = self.root / collection / RUNS
        keep = set()
        for manifest in runs.glob(f"*/{MANIFEST}") if runs.is_dir() else []:
            try:
                keep.add(json.loads(manifest.read_text(encoding="utf-8"))["shard"])
            except (OSError, ValueError, KeyError):
                continue
        shards = index_root(self.root, collection) / SHARDS
        removed = []
        for path in sorted(shards.iterdir()) if shards.is_dir() else []:
            if not path.is_dir() or path.name in keep:
                continue
            marker = shards / f"{path.name}.building"
            if marker.exists():
                try:
                    info = json.loads(marker.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if not owner_dead(info):
                    continue  # a live process is building it (or we cannot tell: another host)
                marker.unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        return removed

    def close(self) -> None:
        """Drop every read handle and private copy."""
        with self._lock:
            handles = [h for _, h in self._handles.values()]
            self._handles.clear()
            copies = list(self._copies)
        for h in handles:
            try:
                h.close()
            except Exception:
                pass
        for key in copies:
            self._drop_copy(key)
