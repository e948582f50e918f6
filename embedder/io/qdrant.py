"""The Qdrant data model shared by every backend: vector names, point ids, payloads, export rows.

Nothing here talks to a store; see :mod:`embedder.io.store` for that.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedder.io.store import PointBatch
from embedder.schemas import Chunk, SparseVector

DENSE_VECTOR = "dense"
POINT_NAMESPACE = uuid.UUID("6f1c0de5-8a8e-4c55-9f5e-3e9d6b1b2a11")


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


def point_batch(
    collection: str,
    chunks: Sequence[Chunk],
    dense: np.ndarray,
    sparse: dict[str, Sequence[SparseVector | None]],
    *,
    start: int = 0,
    stop: int | None = None,
) -> PointBatch:
    """Points ``[start, stop)`` in columns, for a store's upsert (the dense rows stay an array view)."""
    stop = len(chunks) if stop is None else min(stop, len(chunks))
    part = chunks[start:stop]
    return PointBatch(
        point_ids=[point_id(collection, c.id) for c in part],
        dense=np.ascontiguousarray(dense[start:stop], dtype=np.float32),
        sparse={name: vecs[start:stop] for name, vecs in sparse.items()},
        payloads=[payload_for(c) for c in part],
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
    """Points ``[start, stop)`` as plain dicts: the ``qdrant.jsonl`` export rows."""
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
