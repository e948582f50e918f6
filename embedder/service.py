"""FastAPI search service over the collections a run wrote: hybrid retrieval from Qdrant, then rerank.

Run it with ``uvicorn embedder.service:app`` (``EMBEDDER_OUTPUT_DIR`` names the
run's output dir; ``QDRANT_URL`` selects a server instead of local mode).
"""

from __future__ import annotations

import functools
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from embedder.errors import (
    ModelUnavailableError,
    StageError,
    SummaryValidationError,
    UnknownCollectionError,
    UnsafeNameError,
)
from embedder.io.qdrant import qdrant_location_for
from embedder.settings import EmbedderSettings, ServiceSettings, validate_collection_name
from embedder.summary import ProcessingSummary, load_summary


class SearchRequest(BaseModel):
    """A search over one collection."""

    collection: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    query: str = Field(min_length=1, max_length=4096)
    top_k: int = Field(10, ge=1, le=100)
    rerank: bool = True


class SearchHit(BaseModel):
    """One result."""

    id: str
    score: float
    text_preview: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class SearchResponse(BaseModel):
    """Results plus what produced them."""

    collection: str
    fusion: str
    reranked: bool
    rerank_model: str | None = None
    warnings: list[str] = Field(default_factory=list)
    hits: list[SearchHit]


class RunSummaries(BaseModel):
    """Every collection summary a run wrote."""

    run_id: uuid.UUID
    summaries: list[ProcessingSummary]


def summary_for(output_dir: Path, collection: str) -> ProcessingSummary:
    """The collection's processing summary.

    Raises:
        UnsafeNameError: The name could escape the output dir.
        UnknownCollectionError: No summary for it under ``output_dir``.
        SummaryValidationError: The summary is invalid.
    """
    validate_collection_name(collection)
    path = output_dir / collection / "processing_summary.json"
    if not path.is_file():
        raise UnknownCollectionError(f"unknown collection {collection!r} under {output_dir}")
    return load_summary(path)


@functools.lru_cache(maxsize=8)
def _chunk_texts(path: str, mtime: float) -> dict[str, str]:
    from embedder.io.writers import read_chunks

    return {c.id: c.text for c in read_chunks(path)}


def search_collection(root: Path, req: SearchRequest) -> SearchResponse:
    """Hybrid retrieval from the collection's Qdrant index, then a CrossEncoder rerank when asked and available.

    Raises:
    UnknownCollectionError: No summary or no Qdrant collection by that name.
    StageError: The collection has no dense index to search.
    """
    from embedder.batching import BatchPlan
    from embedder.io.qdrant import hybrid_query, open_client, sparse_vector_name
    from embedder.models.registry import resolve_model
    from embedder.models.rerank import RerankEncoder, rerank
    from embedder.models.sparse import load_sparse_model
    from embedder.schemas import Query
    from embedder.settings import RunConfig
    from embedder.stages import dense_encoder

    summary = summary_for(root, req.collection)
    cfg = summary.config
    if not cfg or summary.dense_run is None or summary.dense_run.status != "executed":
        raise StageError(f"collection {req.collection!r} has no dense index; re-run the pipeline")
    warnings: list[str] = []
    local_only = bool(cfg.get("local_files_only", False))
    dense = dense_encoder(RunConfig.model_validate({k: v for k, v in cfg.items() if k in RunConfig.model_fields}),
                          resolve_model(cfg["dense_model"], "dense", local_files_only=local_only))
    qvec = dense.encode_batch([req.query])[0]
    sparse_q = {}
    if summary.sparse_run and summary.sparse_run.executed:
        for name in summary.sparse_run.model_names:
            try:
                model = load_sparse_model(resolve_model(name, "sparse", local_files_only=local_only))
                sparse_q[sparse_vector_name(name)] = model.query_embed([req.query])[0]
            except ModelUnavailableError as exc:
                warnings.append(f"sparse model {name!r} unavailable, dense-only retrieval: {exc}")
    service = ServiceSettings()
    fusion = cfg.get("fusion", "rrf")
    n = max(req.top_k, int(cfg.get("rerank_top_k_candidates", 100)) if req.rerank else req.top_k)
    location = qdrant_location_for(root, req.collection, service.qdrant_url)
    api_key = service.qdrant_api_key.get_secret_value() if service.qdrant_api_key else None
    with open_client(path=None if service.qdrant_url else location, url=service.qdrant_url,
                     api_key=api_key) as client:
        if not client.collection_exists(req.collection):
            raise UnknownCollectionError(f"collection {req.collection!r} is not in Qdrant at {location}")
        cands = hybrid_query(client, req.collection, qvec, sparse_q, fusion=fusion, k=int(cfg.get("rrf_k", 60)),
                             prefetch_limit=n, limit=n)
    reranked = False
    rerank_model = cfg.get("rerank_model") if req.rerank else None
    if req.rerank and cands:
        chunks_path = summary.exports.get("chunks")
        try:
            if not chunks_path or not Path(chunks_path).is_file():
                raise ModelUnavailableError("the collection's chunk table is missing; re-run the pipeline")
            texts = _chunk_texts(chunks_path, Path(chunks_path).stat().st_mtime)
            enc = RerankEncoder(resolve_model(cfg["rerank_model"], "rerank", local_files_only=local_only), "cpu",
                                local_files_only=local_only)
            res = rerank([Query(id="q", text=req.query)], {"q": cands}, texts, enc,
                         top_k_candidates=len(cands), top_k=req.top_k, batch=BatchPlan(32))
            cands = res.results["q"]
            reranked = True
        except ModelUnavailableError as exc:
            warnings.append(f"rerank skipped: {exc}")
    hits = _hydrate(root, req.collection, cands[: req.top_k], service)
    return SearchResponse(collection=req.collection, fusion=fusion, reranked=reranked,
                          rerank_model=rerank_model if reranked else None, warnings=warnings, hits=hits)



def create_app(output_dir: str | Path | None = None) -> FastAPI:
    """Build the app over ``output_dir`` (default: ``EMBEDDER_OUTPUT_DIR``)."""
    root = Path(output_dir or EmbedderSettings().output_dir)
    app = FastAPI(title="embedder search", version="0.1.0")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        collections = sorted(p.parent.name for p in root.glob("*/processing_summary.json"))
        return {"status": "ok", "output_dir": str(root), "collections": collections}

    @app.get("/runs/{run_id}/summary", response_model=RunSummaries)
    def run_summary(run_id: uuid.UUID) -> RunSummaries:
        found = []
        for path in sorted(root.glob("*/processing_summary.json")):
            try:
                s = load_summary(path)
            except SummaryValidationError:
                continue
            if s.run_id == run_id:
                found.append(s)
        if not found:
            raise HTTPException(status_code=404, detail=f"no summary for run {run_id}")
        return RunSummaries(run_id=run_id, summaries=found)

    @app.post("/search", response_model=SearchResponse)
    def search(req: SearchRequest) -> SearchResponse:
        try:
            return search_collection(root, req)
        except UnknownCollectionError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        except UnsafeNameError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        except (SummaryValidationError, StageError) as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc

    return app


def _hydrate(root: Path, collection: str, cands: list, service: ServiceSettings) -> list[SearchHit]:
    from embedder.io.qdrant import open_client, point_id

    if not cands:
        return []
    api_key = service.qdrant_api_key.get_secret_value() if service.qdrant_api_key else None
    with open_client(path=None if service.qdrant_url else qdrant_location_for(root, collection, None),
                     url=service.qdrant_url, api_key=api_key) as client:
        recs = client.retrieve(collection, ids=[point_id(collection, c.id) for c in cands], with_payload=True)
    payloads = {r.payload["chunk_id"]: r.payload for r in recs}
    return [SearchHit(id=c.id, score=c.score, text_preview=payloads.get(c.id, {}).get("text_preview", ""),
                      metadata=payloads.get(c.id, {}).get("metadata", {})) for c in cands]


app = create_app()
