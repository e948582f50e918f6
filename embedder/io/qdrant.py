"""The Qdrant data model shared by every backend: vector names, point ids, payloads, export rows.

Nothing here talks to a store; see :mod:`embedder.io.store` for that.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from embedder.io.store import DENSE_VECTOR, PointBatch
from embedder.schemas import Chunk, SparseVector

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


def point_digest(dense_row: np.ndarray, sparse: dict[str, SparseVector | None], payload: dict[str, Any]) -> str:
    """sha256 of everything a point carries: an index re-run writes only points whose digest changed."""
    h = hashlib.sha256(np.ascontiguousarray(dense_row, dtype=np.float32).tobytes())
    for name in sorted(sparse):
        v = sparse[name]
        if v is not None and v.nnz:
            h.update(name.encode())
            h.update(np.asarray(v.indices, dtype=np.int64).tobytes())
            h.update(np.asarray(v.values, dtype=np.float32).tobytes())
    h.update(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def point_batch(
    collection: str,
    chunks: Sequence[Chunk],
    dense: np.ndarray,
    sparse: Mapping[str, Sequence[SparseVector | None]],
    rows: Sequence[int],
    digests: Mapping[int, str],
) -> PointBatch:
    """The points of ``rows`` in columns, for a store's upsert; each payload carries its ``point_digest``."""
    idx = np.asarray(rows, dtype=np.int64)
    payloads = []
    for r in rows:
        payload = payload_for(chunks[r])
        payload["point_digest"] = digests[r]
        payloads.append(payload)
    return PointBatch(
        point_ids=[point_id(collection, chunks[r].id) for r in rows],
        dense=np.ascontiguousarray(dense[idx], dtype=np.float32),
        sparse={name: [vecs[r] for r in rows] for name, vecs in sparse.items()},
        payloads=payloads,
    )


def build_points(
    collection: str,
    chunks: Sequence[Chunk],
    dense: np.ndarray,
    sparse: Mapping[str, Sequence[SparseVector | None]],
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
