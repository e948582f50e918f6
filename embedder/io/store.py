"""The `VectorStore` protocol: one interface over Qdrant Edge (embedded) and a Qdrant server.

Everything above this module (the index stage, ``search``, the service) talks
to a store through these types only; the backends are
:mod:`embedder.io.edge_store` and :mod:`embedder.io.server_store`, the only
modules that import ``qdrant_edge`` or ``qdrant_client``. This module imports
no backend: :func:`embedder.io.stores.open_store` picks one.

A store publishes an index per collection. Writers build a whole index through
an :class:`IndexWriter` and make it visible with :meth:`IndexWriter.publish`;
readers only ever see a published index.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from embedder.fusion import fuse_dbsf
from embedder.io.integrity import CheckReport, Depth
from embedder.schemas import ScoredCandidate, SparseVector

SearchMode = Literal["exact", "hnsw", "server"]
# The named dense vector of every point (sparse vectors are named per model: ``sparse-<model>``).
DENSE_VECTOR = "dense"
FusionMethod = Literal["rrf", "dbsf"]


@dataclass(frozen=True)
class IndexLayout:
    """The vectors every point of an index carries.

    Attributes:
        dense_dim: Dimension of the named cosine dense vector.
        sparse: ``(vector name, use IDF)`` per sparse model, in run order.
    """

    dense_dim: int
    sparse: tuple[tuple[str, bool], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (stored in the Edge manifest)."""
        return {"dense_dim": self.dense_dim, "sparse": [{"name": n, "idf": idf} for n, idf in self.sparse]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IndexLayout:
        """Inverse of :meth:`to_json`."""
        return cls(int(data["dense_dim"]), tuple((str(s["name"]), bool(s["idf"])) for s in data.get("sparse", [])))


@dataclass
class PointBatch:
    """A batch of points in columns: the dense rows stay one float32 array end to end.

    Attributes:
        point_ids: Qdrant point ids (UUIDv5 strings, see :func:`embedder.io.qdrant.point_id`).
        dense: ``(n, dense_dim)`` float32 rows.
        sparse: Vector name -> one sparse vector (or None: no vector) per point.
        payloads: One payload per point; each holds ``chunk_id``.
    """

    point_ids: list[str]
    dense: np.ndarray
    sparse: dict[str, Sequence[SparseVector | None]]
    payloads: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.point_ids)


@dataclass(frozen=True)
class HybridQuery:
    """One query: a single list (dense or one sparse vector) or several fused by the engine.

    Attributes:
        dense: The dense query vector, or None to leave the dense list out.
        sparse: Vector name -> sparse query vector; empty vectors are left out.
        fusion: ``rrf`` or ``dbsf`` over the lists; ignored when there is one list.
        k: RRF k, in the standard ``1 / (k + rank)`` form with 1-based ranks.
        weights: Optional RRF weight per list: by vector name (``dense``, ``sparse-<model>``; a
            list not named weighs 1), so a list left out for an empty query vector takes its
            weight with it. Weighted RRF only: DBSF has no weights in the engine.
        prefetch_limit: Candidates per list before fusion.
        limit: Results returned.
        exact: Brute-force search even where an HNSW index exists (cross-checks).
    """

    dense: np.ndarray | None = None
    sparse: Mapping[str, SparseVector] = field(default_factory=dict)
    fusion: FusionMethod = "rrf"
    k: int = 60
    weights: Mapping[str, float] | None = None
    prefetch_limit: int = 100
    limit: int = 100
    exact: bool = False

    def lists(self) -> list[tuple[str, np.ndarray | SparseVector]]:
        """``(vector name, query)`` for every list this query searches."""
        out: list[tuple[str, np.ndarray | SparseVector]] = []
        if self.dense is not None:
            out.append((DENSE_VECTOR, np.asarray(self.dense, dtype=np.float32)))
        out.extend((name, vec) for name, vec in self.sparse.items() if vec.nnz)
        return out

    def list_weights(self) -> list[float] | None:
        """The RRF weights in :meth:`lists` order, or None when unweighted."""
        if not self.weights:
            return None
        return [float(self.weights.get(name, 1.0)) for name, _ in self.lists()]


@dataclass(frozen=True)
class PublishedIndex:
    """What a publish made visible.

    Attributes:
        backend: ``edge`` or ``server``.
        location: The shard directory or the server URL.
        collection: The collection name.
        points_count: Points read back from the published index.
        search_mode: ``exact`` (brute force), ``hnsw`` (graph built) or ``server`` (the server indexes itself).
        hnsw_build_s: Seconds spent building the HNSW graph (0 when exact).
        build_id: The physical index's id (the Edge shard directory name, or the server collection).
        segments: The index's segment count, where the store reports it (Edge), else None.
    """

    backend: str
    location: str
    collection: str
    points_count: int
    search_mode: SearchMode
    hnsw_build_s: float = 0.0
    build_id: str = ""
    segments: int | None = None


@dataclass(frozen=True)
class IndexStatus:
    """What a store knows about a collection's published index."""

    exists: bool
    location: str
    layout: IndexLayout | None = None
    points_count: int | None = None
    build_id: str | None = None
    reason: str | None = None


class IndexWriter(Protocol):
    """Builds one index; nothing is visible to readers until :meth:`publish`.

    Attributes:
        incremental: True when the build starts from the published index (same layout), so
            only new, changed and deleted points need writing; False for an empty new index.
    """

    incremental: bool

    def upsert(self, batch: PointBatch) -> int:
        """Write a batch; return how many points it held."""
        ...

    def delete(self, point_ids: Sequence[str]) -> int:
        """Remove points by id; return how many ids were sent."""
        ...

    def publish(self) -> PublishedIndex:
        """Finish the index (flush, HNSW where due) and make it the collection's published index."""
        ...

    def abort(self) -> None:
        """Drop an unpublished build; the published index is untouched."""
        ...


class VectorStore(Protocol):
    """A place that holds one published index per collection."""

    backend: str

    def location(self, collection: str) -> str:
        """Where the collection's index lives (a directory or a URL)."""
        ...

    def status(self, collection: str, run_set: Path | None = None) -> IndexStatus:
        """The published index of a collection (or the one ``run_set`` names, where the store pins), or why none."""
        ...

    def writer(self, collection: str, layout: IndexLayout, *, incremental: bool = True,
               run_path: Path | None = None, expected_points: int | None = None) -> IndexWriter:
        """Start building the collection's next index, from the published one when ``incremental`` allows.

        With ``run_path``, :meth:`IndexWriter.publish` names the new index in that run
        set's ``index.json`` and the caller publishes the set; without it, the index
        is published on its own. ``expected_points`` (the final point count, when
        known) lets a store plan its build, e.g. Edge's graph a segment at a time.

        Raises:
            VectorIndexError: The store cannot be reached.
            IndexLayoutError: The store cannot take this layout for the collection.
        """
        ...

    def point_digests(self, collection: str) -> dict[str, str | None]:
        """Point id -> the ``point_digest`` payload of every point in the published index (empty if none)."""
        ...

    def verify(self, collection: str, depth: Depth = "quick") -> CheckReport | None:
        """Check the published index's files against the checksums it was sealed with.

        Returns:
            What the check found, or None when the store keeps no checksums (a server owns its storage).
        """
        ...

    def keep_published(self, collection: str, run_path: Path) -> None:
        """Name the published index, unchanged, in a new run set."""
        ...

    def vectors(self, collection: str, point_ids: Sequence[str],
                build_id: str | None = None) -> dict[str, dict[str, Any]]:
        """Point id -> vector name -> the vector the index holds (a dense list or a SparseVector).

        Args:
            build_id: The physical index to read (one just built), default the published one.

        Raises:
            IndexDamagedError: The index cannot be read.
        """
        ...

    def query(self, collection: str, query: HybridQuery, run_set: Path | None = None) -> list[ScoredCandidate]:
        """Search the published index; candidates carry chunk ids, best first.

        ``run_set`` pins the index a run set names (Edge); a server searches what its alias points at.

        Raises:
            IndexNotFoundError: No published index exists.
        """
        ...

    def payloads(self, collection: str, point_ids: Sequence[str],
                 run_set: Path | None = None) -> dict[str, dict[str, Any]]:
        """Payloads of the given points (missing points are left out), keyed by point id."""
        ...

    def close(self) -> None:
        """Release every handle the store holds."""
        ...


def hybrid_search(store: VectorStore, collection: str, query: HybridQuery,
                  run_set: Path | None = None) -> list[ScoredCandidate]:
    """Search ``store`` with ``query``'s fusion exactly as :mod:`embedder.fusion` scores it.

    The engine fuses RRF (weighted or not) and unweighted DBSF itself. Its DBSF
    has no list weights, so weighted DBSF (what a tuned ``fusion_weights`` file
    asks for) searches each list on its own, ``prefetch_limit`` deep as the
    engine's prefetch would, and fuses them here with :func:`embedder.fusion.fuse_dbsf`.
    Search then ranks as the run's fusion stage and ``eval`` report.

    Args:
        run_set: Search the index this run set names (Edge), not whatever is current when the query runs.

    Raises:
        IndexNotFoundError: No published index for ``collection``.
    """
    pinned: dict[str, Any] = {"run_set": run_set} if run_set is not None else {}
    lists = query.lists()
    weights = query.list_weights()
    if query.fusion != "dbsf" or len(lists) < 2 or not weights or all(w == 1.0 for w in weights):
        return store.query(collection, query, **pinned)
    def one_list(name: str, vec: np.ndarray | SparseVector) -> HybridQuery:
        if isinstance(vec, SparseVector):
            return replace(query, dense=None, sparse={name: vec}, weights=None, limit=query.prefetch_limit)
        return replace(query, dense=vec, sparse={}, weights=None, limit=query.prefetch_limit)

    per_list = [store.query(collection, one_list(name, vec), **pinned) for name, vec in lists]
    return fuse_dbsf(per_list, weights=weights)[: query.limit]
