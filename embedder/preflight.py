"""Preflight: everything that would fail deterministically later is checked before any GPU work."""

from __future__ import annotations

from pathlib import Path

from embedder.errors import EmbedderError, InputFormatError
from embedder.io.readers import read_qrels, read_queries
from embedder.models.registry import get_spec, resolve_model
from embedder.settings import RunConfig


def preflight(config: RunConfig) -> None:
    """Check the run's models, input paths, queries and qrels; raise naming the file (and line) at fault.

    Runs in seconds: a malformed queries or qrels line must not surface after
    the whole collection was embedded under the GPU lease.

    Raises:
        EmbedderError: The first problem found (unknown model, unavailable dense
            model, missing input, malformed queries or qrels line).
    """
    if not config.collections:
        raise EmbedderError("the run names no collections")
    get_spec(config.rerank.model, "rerank")
    for name in config.sparse.models:
        get_spec(name, "sparse")
    for name, _weight in config.dense.components():
        resolve_model(name, "dense", local_files_only=config.local_files_only)
    for collection in config.collections:
        if not Path(collection.path).exists():
            raise InputFormatError(f"collection {collection.name!r}: input {collection.path!r} does not exist")
    queries = read_queries(config.queries_path) if config.queries_path else []
    if config.qrels_path:
        qrels = read_qrels(config.qrels_path)
        if queries and not set(qrels) & {q.id for q in queries}:
            raise InputFormatError(f"qrels file {config.qrels_path!r} judges none of the queries in "
                                   f"{config.queries_path!r}: they are not the same query set")
