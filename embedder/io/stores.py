"""The factory that picks a vector-store backend; :mod:`embedder.io.store` holds the protocol and its types."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embedder.io.store import VectorStore


def open_store(output_dir: str | Path, *, url: str | None = None, api_key: str | None = None,
               timeout_s: float = 30.0, hnsw_min_points: int | None = None,
               client: Any | None = None) -> VectorStore:
    """The store for a run or a reader: a Qdrant server when ``url`` (or ``client``) is given, else Edge.

    Args:
        output_dir: The run's output dir; Edge keeps ``<output_dir>/<collection>/index/`` there.
        url: A Qdrant server URL (``QDRANT_URL``).
        api_key: The server's API key (``QDRANT_API_KEY``).
        timeout_s: Server request timeout.
        hnsw_min_points: Edge builds an HNSW graph at or above this many points, else searches exactly.
        client: An already constructed ``QdrantClient`` (tests use one in local mode as a stand-in).
    """
    if url or client is not None:
        from embedder.io.server_store import ServerStore

        return ServerStore(url=url, api_key=api_key, timeout_s=timeout_s, client=client)
    from embedder.io.edge_store import DEFAULT_HNSW_MIN_POINTS, EdgeStore

    return EdgeStore(output_dir, hnsw_min_points=hnsw_min_points or DEFAULT_HNSW_MIN_POINTS)
