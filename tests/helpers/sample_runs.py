"""The sample collection run in-process, and what `search` answers after it: shared by the heal tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embedder.settings import CollectionInput, RunConfig
from tests.conftest import SAMPLE_DIR

QUERIES = ["how do bees make honey", "volcano eruption and lava", "tides and the moon", "espresso extraction"]


def sample_config(out: Path, src: Path = SAMPLE_DIR, **settings: Any) -> RunConfig:
    """The sample collection (named ``sample``) into ``out``, offline, without rerank; ``settings`` by path."""
    return RunConfig(collections=[CollectionInput(name="sample", path=str(src))], output_dir=str(out),
                     local_files_only=True, rerank={"enabled": False}).model_copy(update=settings)


def run_one(config: RunConfig) -> Any:
    """Run the flow in-process; return the one collection's summary."""
    from flows.embed_collections import embed_collections

    [summary] = embed_collections(config)
    return summary


def answers(out: Path) -> list[list[tuple[str, float]]]:
    """What `search` answers to a few queries: ids and scores, best first (ties by id: equal RRF scores have
    no order of their own, and a rebuilt shard may list them in another)."""
    from embedder.service import SearchRequest, search_collection

    return [ranked([(h.id, h.score) for h in search_collection(
        out, SearchRequest(collection="sample", query=q, top_k=5, rerank=False)).hits]) for q in QUERIES]


def ranked(hits: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Hits rounded and ordered by score, then id."""
    return sorted(((i, round(s, 4)) for i, s in hits), key=lambda h: (-h[1], h[0]))
