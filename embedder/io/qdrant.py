"""Qdrant: collection setup, idempotent batched upserts and hybrid queries.

Local mode (a path under the output dir) is the default; a server URL goes
through the same code.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from embedder.errors import VectorIndexError
from embedder.schemas import Chunk, ScoredCandidate, SparseVector

DENSE_VECTOR = "dense"
POINT_NAMESPACE = uuid.UUID("6f1c0de5-8a8e-4c55-9f5e-3e9d6b1b2a11")


def qdrant_location_for(output_dir: Path, collection: str, url: str | None) -> str:
    """The server URL, or the local-mode path ``<output_dir>/<collection>/qdrant``."""
    return url or str(output_dir / collection / "qdrant")


def sparse_vector_name(model_name: str) -> str:
    """The named sparse vector for a sparse model (``sparse-qdrant-bm25``)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in model_name)
    return f"sparse-{safe}"


def point_id(collection: str, chunk_id: str) -> str:
    """UUIDv5 of (collection, chunk id): a re-run overwrites the same point."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{collection}\x1f{chunk_id}"))


def payload_for(chunk: Chunk, preview_chars: int = 300) -> dict[str, Any]:
    """The point payload: chunk id, a text preview and the metadata (minus bulky term weights)."""
    metadata = {k: v for k, v in chunk.metadata.items() if k != "sparse_features"}
    return {"chunk_id": chunk.id, "text_preview": chunk.text[:preview_chars], "metadata": metadata}


@contextmanager
def open_client(*, path: str | Path | None = None, url: str | None = None, api_key: str | None = None,
                timeout_s: float = 30.0) -> Iterator[Any]:
    """A QdrantClient for a server (``url``) or local mode (``path``), closed afterwards.

    Raises:
        VectorIndexError: If the server cannot be reached.
    """
    from qdrant_client import QdrantClient

    if url:
        client = QdrantClient(url=url, api_key=api_key, timeout=int(timeout_s))
    else:
        if path is None:
            raise VectorIndexError("Qdrant local mode needs a path")
        Path(path).mkdir(parents=True, exist_ok=True)
        client = QdrantClient(path=str(path))
    try:
        yield client
    finally:
        client.close()


def ensure_collection(client: Any, name: str, dim: int, sparse_names: Sequence[str]) -> None:
    """Create the collection with a named cosine dense vector and IDF sparse vectors, if missing.

    Raises:
        VectorIndexError: If an existing collection has an incompatible layout.
    """
    from qdrant_client import models

    if client.collection_exists(name):
        info = client.get_collection(name)
        vectors = info.config.params.vectors
        existing_dim = vectors[DENSE_VECTOR].size if isinstance(vectors, dict) and DENSE_VECTOR in vectors else None
        if existing_dim != dim:
            raise VectorIndexError(
                f"Qdrant collection {name!r} has dense dim {existing_dim}, the model gives {dim}; "
                "use another collection name or delete the old collection"
            )
        sparse = info.config.params.sparse_vectors or {}
        missing = [s for s in sparse_names if s not in sparse]
        if missing:
            raise VectorIndexError(f"Qdrant collection {name!r} lacks sparse vectors {missing}")
        return
    client.create_collection(
        collection_name=name,
        vectors_config={DENSE_VECTOR: models.VectorParams(size=dim, distance=models.Distance.COSINE)},
        sparse_vectors_config={s: models.SparseVectorParams(modifier=models.Modifier.IDF) for s in sparse_names},
    )


def build_points(
    collection: str,
    chunks: Sequence[Chunk],
    dense: np.ndarray,
    sparse: dict[str, Sequence[SparseVector | None]],
    *,
    start: int = 0,
    stop: int | None = None,
) -> list[dict[str, Any]]:
    """Points ``[start, stop)`` as plain dicts (also the ``qdrant.jsonl`` export rows)."""
    points = []
    for i in range(start, len(chunks) if stop is None else min(stop, len(chunks))):
        chunk = chunks[i]
        vector: dict[str, Any] = {DENSE_VECTOR: [float(x) for x in dense[i]]}
        for name, vecs in sparse.items():
            v = vecs[i]
            if v is not None and v.nnz:
                vector[name] = {"indices": list(v.indices), "values": list(v.values)}
        points.append({"id": point_id(collection, chunk.id), "vector": vector, "payload": payload_for(chunk)})
    return points


def upsert_points(client: Any, name: str, points: Sequence[dict[str, Any]]) -> int:
    """Upsert one batch with ``wait=True``; return how many points were sent."""
    from qdrant_client import models

    batch = []
    for p in points:
        vector = {k: (models.SparseVector(**v) if isinstance(v, dict) else v) for k, v in p["vector"].items()}
        batch.append(models.PointStruct(id=p["id"], vector=vector, payload=p["payload"]))
    client.upsert(collection_name=name, points=batch, wait=True)
    return len(batch)


def count_points(client: Any, name: str) -> int:
    """Exact point count of a collection."""
    return int(client.count(collection_name=name, exact=True).count)


def hybrid_query(
    client: Any,
    name: str,
    dense_query: np.ndarray,
    sparse_queries: dict[str, SparseVector],
    *,
    fusion: str = "rrf",
    k: int = 60,
    prefetch_limit: int = 100,
    limit: int = 100,
) -> list[ScoredCandidate]:
    """Hybrid retrieval through the Query API: dense + sparse prefetches fused by RRF or DBSF.

    Returns candidates by chunk id (from the payload), best first.
    """
    from qdrant_client import models

    prefetch = [models.Prefetch(query=[float(x) for x in dense_query], using=DENSE_VECTOR, limit=prefetch_limit)]
    for vec_name, sq in sparse_queries.items():
        if sq.nnz:
            prefetch.append(models.Prefetch(query=models.SparseVector(indices=sq.indices, values=sq.values),
                                            using=vec_name, limit=prefetch_limit))
    # Qdrant scores RRF as 1 / (k + position) with 0-based positions; embedder.fusion uses the
    # standard 1 / (k + rank) with 1-based ranks. k + 1 makes the two agree exactly.
    query: Any = (models.RrfQuery(rrf=models.Rrf(k=k + 1)) if fusion == "rrf"
                  else models.FusionQuery(fusion=models.Fusion.DBSF))
    resp = client.query_points(collection_name=name, prefetch=prefetch, query=query, limit=limit,
                               with_payload=["chunk_id"])
    return [ScoredCandidate(id=p.payload["chunk_id"], score=float(p.score)) for p in resp.points]
