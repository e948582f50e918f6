"""The load stage: validate a collection into the chunk table and ``rejects.jsonl``."""

from __future__ import annotations

from embedder.io.load import LoadResult, load_collection
from embedder.settings import CollectionInput, RunConfig
from embedder.stages.common import SummarySection, input_digest, seal, stage_dir, stage_key


def load_key(config: RunConfig, collection: CollectionInput) -> str:
    """Cache key of the load stage."""
    return stage_key(config, collection.name, "load", input_digest(collection.path))


def load_stage(config: RunConfig, collection: CollectionInput, key: str) -> LoadResult:
    """Validate a collection into ``.stages/load/<key>/chunks.parquet`` plus ``rejects.jsonl``."""
    path = stage_dir(config, collection.name, "load", key)
    result = load_collection(collection.path, path / "chunks.parquet", path / "rejects.jsonl",
                             max_chunk_chars=config.max_chunk_chars)
    return seal(path, result)


def load_section(load: LoadResult | None) -> SummarySection:
    """``chunk_count`` and the load warnings (rejects, truncation, an empty collection)."""
    if load is None:
        return SummarySection(fields={"chunk_count": 0})
    return SummarySection(fields={"chunk_count": load.chunk_count}, warnings=list(load.warnings))
