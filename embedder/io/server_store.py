"""Qdrant server backend through qdrant-client (``QDRANT_URL``, ``QDRANT_API_KEY``).

The only module that talks to a Qdrant server. Tests drive it with a
qdrant-client in local mode standing in for the server: the client API is the
same, only the transport differs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embedder.errors import IndexLayoutError, IndexNotFoundError, VectorIndexError
from embedder.io.atomic import atomic_write_text
from embedder.io.integrity import CheckReport, Depth
from embedder.io.store import DENSE_VECTOR, HybridQuery, IndexLayout, IndexStatus, PointBatch, PublishedIndex
from embedder.schemas import ScoredCandidate, SparseVector


def _layout_of(info: Any) -> IndexLayout | None:
    vectors = info.config.params.vectors
    if not isinstance(vectors, dict) or DENSE_VECTOR not in vectors:
        return None
    sparse = info.config.params.sparse_vectors or {}
    from qdrant_client import models

    return IndexLayout(int(vectors[DENSE_VECTOR].size),
                       tuple((name, p.modifier == models.Modifier.IDF) for name, p in sparse.items()))


class ServerIndexWriter:
    """Writes a collection's points on the server, blue/green when the layout changes.

    The name users search is an alias of a physical collection
    (``<collection>--<build>``). With the same layout the writer updates that
    physical collection in place (incremental). With a new layout (another
    model or dimension) it fills a new physical collection and, on publish,
    moves the alias to it in one alias operation, then drops the old one: the
    old index serves until the new one is complete.
    """

    def __init__(self, store: ServerStore, collection: str, layout: IndexLayout, *, incremental: bool = True,
                 run_path: Path | None = None) -> None:
        import uuid
        from datetime import UTC, datetime

        self.run_path = run_path
        self.store = store
        self.collection = collection
        self.layout = layout
        self.previous = store.physical(collection)
        existing = _layout_of(store.call(lambda c: c.get_collection(self.previous))) if self.previous else None
        self.incremental = bool(incremental and self.previous and existing == layout)
        if self.incremental and self.previous is not None:
            self.target: str = self.previous
        else:
            self.target = f"{collection}--{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
            store.ensure_collection(self.target, layout)
        self._done = False

    def upsert(self, batch: PointBatch) -> int:
        """Upsert one batch with ``wait=True``."""
        from qdrant_client import models

        points = []
        for i, pid in enumerate(batch.point_ids):
            vector: dict[str, Any] = {DENSE_VECTOR: batch.dense[i].tolist()}
            for name, vecs in batch.sparse.items():
                v = vecs[i]
                if v is not None and v.nnz:
                    vector[name] = models.SparseVector(indices=list(v.indices), values=list(v.values))
            points.append(models.PointStruct(id=pid, vector=vector, payload=batch.payloads[i]))
        self.store.call(lambda c: c.upsert(collection_name=self.target, points=points, wait=True))
        return len(points)

    def delete(self, point_ids: Sequence[str]) -> int:
        """Delete points by id with ``wait=True``."""
        from qdrant_client import models

        if not point_ids:
            return 0
        self.store.call(lambda c: c.delete(collection_name=self.target, wait=True,
                                           points_selector=models.PointIdsList(points=list(point_ids))))
        return len(point_ids)

    def publish(self) -> PublishedIndex:
        """Point the alias at the written collection (a no-op when updated in place); read the count back."""
        from qdrant_client import models

        if not self.incremental:
            ops: list[Any] = []
            if self.store.is_alias(self.collection):
                ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self.collection)))
            elif self.previous == self.collection:
                # A plain collection of that name (an earlier version's): it must go before the alias can exist.
                self.store.call(lambda c: c.delete_collection(self.collection))
            ops.append(models.CreateAliasOperation(create_alias=models.CreateAlias(
                collection_name=self.target, alias_name=self.collection)))
            self.store.call(lambda c: c.update_collection_aliases(change_aliases_operations=ops))
            if self.previous and self.previous != self.collection:
                self.store.call(lambda c: c.delete_collection(self.previous))
        self._done = True
        count = self.store.count(self.collection)
        if self.run_path is not None:
            self.store.keep_published(self.collection, self.run_path)
        return PublishedIndex(backend="server", location=self.store.url, collection=self.collection,
                              points_count=count, search_mode="server", build_id=self.target)

    def abort(self) -> None:
        """Drop a new physical collection that was never published; in-place writes cannot be undone."""
        if self._done or self.incremental:
            return
        self._done = True
        try:
            self.store.call(lambda c: c.delete_collection(self.target))
        except Exception:  # the server is gone: nothing more to do here
            pass


class ServerStore:
    """A Qdrant server (or a qdrant-client local-mode client standing in for one in tests)."""

    backend = "server"

    def __init__(self, *, url: str | None = None, api_key: str | None = None, timeout_s: float = 30.0,
                 client: Any | None = None) -> None:
        if client is None:
            from qdrant_client import QdrantClient

            client = QdrantClient(url=url, api_key=api_key, timeout=int(timeout_s))
        self._client = client
        self.url = url or "qdrant-client"

    def call(self, fn: Any) -> Any:
        """Run ``fn(client)``, turning transport and server errors into :class:`VectorIndexError`."""
        try:
            return fn(self._client)
        except VectorIndexError:
            raise
        except Exception as exc:
            raise VectorIndexError(f"Qdrant at {self.url} failed: {type(exc).__name__}: {exc}") from exc

    def location(self, collection: str) -> str:
        """The server URL."""
        return self.url

    def is_alias(self, name: str) -> bool:
        """Whether ``name`` is an alias on the server."""
        aliases = self.call(lambda c: c.get_aliases()).aliases
        return any(a.alias_name == name for a in aliases)

    def physical(self, collection: str) -> str | None:
        """The physical collection behind the name: the alias target, a plain collection of that name, or None."""
        for a in self.call(lambda c: c.get_aliases()).aliases:
            if a.alias_name == collection:
                return str(a.collection_name)
        return collection if self.call(lambda c: c.collection_exists(collection)) else None

    def status(self, collection: str, run_set: Path | None = None) -> IndexStatus:
        """Whether the collection exists on the server, with its layout and point count."""
        if not self.call(lambda c: c.collection_exists(collection)):
            return IndexStatus(exists=False, location=self.url,
                               reason=f"collection {collection!r} does not exist on the Qdrant server at {self.url}; "
                                      "run `embed-collections run` for it first")
        info = self.call(lambda c: c.get_collection(collection))
        return IndexStatus(exists=True, location=self.url, layout=_layout_of(info), points_count=self.count(collection),
                           build_id=collection)

    def ensure_collection(self, name: str, layout: IndexLayout) -> bool:
        """Create the collection with the layout, or check an existing one has it; True if it existed.

        Raises:
            VectorIndexError: An existing collection has another dense dimension or lacks a sparse vector.
        """
        from qdrant_client import models

        if self.call(lambda c: c.collection_exists(name)):
            existing = _layout_of(self.call(lambda c: c.get_collection(name)))
            dim = existing.dense_dim if existing else None
            if dim != layout.dense_dim:
                raise IndexLayoutError(
                    f"Qdrant collection {name!r} has dense dim {dim}, the model gives {layout.dense_dim}; "
                    "use another collection name or delete the old collection")
            missing = [n for n, _ in layout.sparse if existing is None or n not in dict(existing.sparse)]
            if missing:
                raise IndexLayoutError(f"Qdrant collection {name!r} lacks sparse vectors {missing}")
            return True
        self.call(lambda c: c.create_collection(
            collection_name=name,
            vectors_config={DENSE_VECTOR: models.VectorParams(size=layout.dense_dim, distance=models.Distance.COSINE)},
            sparse_vectors_config={n: models.SparseVectorParams(modifier=models.Modifier.IDF if idf else None)
                                   for n, idf in layout.sparse},
        ))
        return False

    def count(self, collection: str) -> int:
        """Exact point count."""
        return int(self.call(lambda c: c.count(collection_name=collection, exact=True)).count)

    def writer(self, collection: str, layout: IndexLayout, *, incremental: bool = True,
               run_path: Path | None = None, expected_points: int | None = None) -> ServerIndexWriter:
        """A writer into the server collection (its writes are live as they land).

        ``expected_points`` is unused: the server indexes in the background on its own schedule.
        """
        return ServerIndexWriter(self, collection, layout, incremental=incremental, run_path=run_path)

    def keep_published(self, collection: str, run_path: Path) -> None:
        """Record in the run set which server collection holds its points."""
        manifest = {"backend": "server", "location": self.url, "collection": collection,
                    "points_count": self.count(collection)}
        atomic_write_text(run_path / "index.json", json.dumps(manifest, indent=2))

    def point_digests(self, collection: str) -> dict[str, str | None]:
        """Point id -> ``point_digest`` payload, scrolled from the server."""
        if not self.call(lambda c: c.collection_exists(collection)):
            return {}
        out: dict[str, str | None] = {}
        offset = None
        while True:
            records, offset = self.call(lambda c, off=offset: c.scroll(
                collection_name=collection, limit=10_000, offset=off, with_payload=["point_digest"],
                with_vectors=False))
            for r in records:
                out[str(r.id)] = (r.payload or {}).get("point_digest")
            if offset is None or not records:
                return out

    def query(self, collection: str, query: HybridQuery, run_set: Path | None = None) -> list[ScoredCandidate]:
        """The Query API: one list, or prefetches fused by RRF / DBSF on the server (``run_set`` is not pinned)."""
        from qdrant_client import models

        lists = query.lists()
        if not lists:
            return []
        if not self.call(lambda c: c.collection_exists(collection)):
            raise IndexNotFoundError(self.status(collection).reason)
        params = models.SearchParams(exact=True) if query.exact else None

        def q(vec: Any) -> Any:
            if isinstance(vec, SparseVector):
                return models.SparseVector(indices=list(vec.indices), values=list(vec.values))
            return vec.tolist()

        if len(lists) == 1:
            name, vec = lists[0]
            resp = self.call(lambda c: c.query_points(collection_name=collection, query=q(vec), using=name,
                                                      limit=query.limit, search_params=params,
                                                      with_payload=["chunk_id"]))
        else:
            prefetch = [models.Prefetch(query=q(v), using=n, limit=query.prefetch_limit, params=params)
                        for n, v in lists]
            # Qdrant counts RRF positions from 0; embedder.fusion ranks from 1 (see edge_store).
            fusion: Any = (models.RrfQuery(rrf=models.Rrf(k=query.k + 1,
                                                          weights=query.list_weights()))
                           if query.fusion == "rrf" else models.FusionQuery(fusion=models.Fusion.DBSF))
            resp = self.call(lambda c: c.query_points(collection_name=collection, prefetch=prefetch, query=fusion,
                                                      limit=query.limit, with_payload=["chunk_id"]))
        return [ScoredCandidate(id=p.payload["chunk_id"], score=float(p.score)) for p in resp.points]

    def verify(self, collection: str, depth: Depth = "quick") -> CheckReport | None:
        """None: the server owns its storage and its checks; the index stage still reads points back."""
        return None

    def vectors(self, collection: str, point_ids: Sequence[str],
                build_id: str | None = None) -> dict[str, dict[str, Any]]:
        """The stored vectors of points (point id -> vector name -> dense list or SparseVector).

        Args:
            build_id: The physical collection to read (default: what the name points at).
        """
        if not point_ids:
            return {}
        recs = self.call(lambda c: c.retrieve(build_id or collection, ids=list(point_ids), with_vectors=True))
        out: dict[str, dict[str, Any]] = {}
        for r in recs:
            vecs = r.vector if isinstance(r.vector, dict) else {}
            out[str(r.id)] = {name: (SparseVector(indices=list(v.indices), values=list(v.values))
                                     if hasattr(v, "indices") else v) for name, v in vecs.items()}
        return out

    def payloads(self, collection: str, point_ids: Sequence[str],
                 run_set: Path | None = None) -> dict[str, dict[str, Any]]:
        """Payloads of the given points, keyed by point id."""
        if not point_ids:
            return {}
        recs = self.call(lambda c: c.retrieve(collection, ids=list(point_ids), with_payload=True))
        return {str(r.id): dict(r.payload or {}) for r in recs}

    def close(self) -> None:
        """Close the client."""
        try:
            self._client.close()
        except Exception:
            pass
