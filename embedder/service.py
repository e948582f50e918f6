"""FastAPI search service over the collections a run wrote: hybrid retrieval from the index, then rerank.

Run it with ``uvicorn embedder.service:app`` (``EMBEDDER_OUTPUT_DIR`` names the
run's output dir; ``QDRANT_URL`` selects a server instead of the embedded Qdrant Edge shards).
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator

from embedder.errors import (
    IndexNotFoundError,
    ModelUnavailableError,
    StageError,
    SummaryValidationError,
    UnknownCollectionError,
    VectorIndexError,
)
from embedder.io.store import VectorStore
from embedder.io.stores import open_store
from embedder.settings import ServiceSettings, resolve_run_config, validate_collection_name
from embedder.summary import ProcessingSummary, load_summary

QUERY_PATTERN = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"


class SearchRequest(BaseModel):
    """A search over one collection."""

    collection: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # The pattern only documents, for clients and contract tests, what ``_text`` checks: no NUL and
    # not only whitespace (\s as Python's str.isspace reads it). The validator's messages are clearer.
    query: str = Field(min_length=1, max_length=4096, json_schema_extra={"pattern": QUERY_PATTERN})
    top_k: int = Field(10, ge=1, le=100)
    rerank: bool = True

    @field_validator("collection")
    @classmethod
    def _safe(cls, value: str) -> str:
        # A 422 like any other invalid field, not a bespoke error shape.
        return validate_collection_name(value)

    @field_validator("query")
    @classmethod
    def _text(cls, value: str) -> str:
        # A tokenizer cannot take either; a clear 422 rather than an error deep in a model.
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
        if not value.strip():
            raise ValueError("must contain text, not only whitespace")
        return value


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


def summary_for(output_dir: Path, collection: str, run_set: Path | None = None) -> ProcessingSummary:
    """The summary of the run whose exports and index a published set holds.

    Args:
        run_set: The resolved run set to read (see :func:`published_set`); default the current one.

    Raises:
        UnsafeNameError: The name could escape the output dir.
        UnknownCollectionError: No summary for it under ``output_dir``.
        SummaryValidationError: The summary is invalid.
    """
    validate_collection_name(collection)
    base = run_set if run_set is not None else output_dir / collection
    path = base / "processing_summary.json"
    if not path.is_file():
        raise UnknownCollectionError(f"unknown collection {collection!r} under {output_dir}")
    summary = load_summary(path)
    # After a failed run, the exports and index beside its summary are an earlier run's: search uses
    # that run's summary (its models and settings built the index).
    served = base / "exports_summary.json"
    if summary.exports_run_id is not None and served.is_file():
        return load_summary(served)
    return summary


def published_set(output_dir: Path, collection: str) -> Path | None:
    """The collection's published run set, resolved once: one search reads its summary and index together.

    A run publishing meanwhile switches ``current`` to another set; a search that
    took its query model from one set and searched the other's shard would mix
    two models (another dimension) or two runs.
    """
    from embedder.io.runset import current_run

    validate_collection_name(collection)
    return current_run(output_dir, collection)


@functools.lru_cache(maxsize=8)
def _chunk_texts(path: str, mtime: float) -> dict[str, str]:
    from embedder.io.writers import read_chunks

    return {c.id: c.text for c in read_chunks(path)}


def search_collection(root: Path, req: SearchRequest, store: VectorStore | None = None) -> SearchResponse:
    """Hybrid retrieval from the collection's published index, then a CrossEncoder rerank when asked and available.

    Args:
        root: The run's output dir.
        req: The search.
        store: An open store to reuse (the service keeps one per process); opened and closed here otherwise.

    Raises:
        UnknownCollectionError: No summary by that name under ``root``.
        StageError: The collection's run produced no dense vectors.
        IndexNotFoundError: No published index exists for it.
    """
    from embedder.io.qdrant import point_id, sparse_vector_name
    from embedder.io.store import DENSE_VECTOR, HybridQuery, hybrid_search
    from embedder.models.engine import plan_token_budget
    from embedder.models.registry import resolve_model
    from embedder.models.rerank import RerankEncoder, rerank
    from embedder.models.sparse import load_sparse_model
    from embedder.schemas import Query
    from embedder.settings import RunConfig
    from embedder.stages import query_vector

    run_set = published_set(root, req.collection)
    summary = summary_for(root, req.collection, run_set)
    cfg = summary.config
    if not cfg or summary.dense_run is None or summary.dense_run.status != "executed":
        raise StageError(f"collection {req.collection!r} has no dense vectors; re-run the pipeline")
    own_store = store is None
    store = store or open_service_store(root)
    try:
        status = store.status(req.collection, run_set=run_set)
        if not status.exists:
            raise IndexNotFoundError(status.reason or f"no index for {req.collection!r}")
        indexed_sparse = {name for name, _ in status.layout.sparse} if status.layout else set()
        warnings: list[str] = []
        # The run's own settings; a key an older summary lacks takes its default from the one definition.
        run_config = RunConfig.from_recorded(cfg)
        local_only = run_config.local_files_only
        qvec = query_vector(run_config, req.query)
        sparse_q = {}
        if summary.sparse_run and summary.sparse_run.executed:
            for name in summary.sparse_run.model_names:
                if sparse_vector_name(name) not in indexed_sparse:
                    continue
                try:
                    model = load_sparse_model(resolve_model(name, "sparse", local_files_only=local_only))
                    sparse_q[sparse_vector_name(name)] = model.query_embed([req.query])[0]
                except ModelUnavailableError as exc:
                    warnings.append(f"sparse model {name!r} unavailable, dense-only retrieval: {exc}")
        n = max(req.top_k, run_config.rerank.top_k_candidates) if req.rerank else req.top_k
        # The run's own fusion weights (a tuned file read with --config), by vector name.
        by_list = run_config.fuse.weights
        weights = {(DENSE_VECTOR if name == "dense" else sparse_vector_name(name)): float(w)
                   for name, w in by_list.items()} or None
        # Search ranks as the run's fusion stage and eval score it: hybrid_search fuses weighted DBSF
        # itself (the engine's DBSF has no weights), and each list goes as deep as the stage took it,
        # since fused scores depend on depth (RRF on who is in a list, DBSF on its score spread).
        depth = max(n, run_config.fuse.retrieval_top_n)
        fuse = run_config.fuse
        cands = hybrid_search(store, req.collection, HybridQuery(dense=qvec, sparse=sparse_q, fusion=fuse.method,
                                                                 k=fuse.rrf_k, weights=weights,
                                                                 prefetch_limit=depth, limit=n), run_set)
        reranked = False
        rerank_model = run_config.rerank.model if req.rerank else None
        if req.rerank and cands:
            # The published set's own chunk table (the stable link): a carried summary's paths may name a
            # set that was pruned since.
            stable = (run_set if run_set is not None else root / req.collection) / "chunks.parquet"
            chunks_path = str(stable) if stable.is_file() else summary.exports.get("chunks")
            try:
                if not chunks_path or not Path(chunks_path).is_file():
                    raise ModelUnavailableError("the collection's chunk table is missing; re-run the pipeline")
                texts = _chunk_texts(chunks_path, Path(chunks_path).stat().st_mtime)
                enc = RerankEncoder(resolve_model(run_config.rerank.model, "rerank", local_files_only=local_only),
                                    "cpu", local_files_only=local_only)
                res = rerank([Query(id="q", text=req.query)], {"q": cands}, texts, enc,
                             top_k_candidates=len(cands), top_k=req.top_k,
                             budget=lambda: plan_token_budget(enc.shape(), "cpu", "fp32", 0.0, cpu_items=32))
                cands = res.results["q"]
                reranked = True
            except ModelUnavailableError as exc:
                warnings.append(f"rerank skipped: {exc}")
        top = cands[: req.top_k]
        payloads = store.payloads(req.collection, [point_id(req.collection, c.id) for c in top],
                                  run_set=run_set)
        if note := getattr(store, "notes", {}).get(req.collection):
            warnings.append(note)
    finally:
        if own_store:
            store.close()
    by_chunk = {p.get("chunk_id"): p for p in payloads.values()}
    hits = [SearchHit(id=c.id, score=c.score, text_preview=by_chunk.get(c.id, {}).get("text_preview", ""),
                      metadata=by_chunk.get(c.id, {}).get("metadata", {})) for c in top]
    return SearchResponse(collection=req.collection, fusion=run_config.fuse.method, reranked=reranked,
                          rerank_model=rerank_model if reranked else None, warnings=warnings, hits=hits)


def open_service_store(root: Path) -> VectorStore:
    """The store a reader uses: the Qdrant server of ``QDRANT_URL``, else the Edge shards under ``root``."""
    service = ServiceSettings()
    api_key = service.qdrant_api_key.get_secret_value() if service.qdrant_api_key else None
    return open_store(root, url=service.qdrant_url, api_key=api_key, timeout_s=service.qdrant_timeout_s)


class ErrorResponse(BaseModel):
    """Why a request failed."""

    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No collection (no processing summary) by that name."},
    409: {"model": ErrorResponse, "description": "The collection's summary is invalid or its run produced no "
                                                 "dense vectors; re-run the pipeline."},
    503: {"model": ErrorResponse, "description": "No usable published index for the collection: never indexed, "
                                                 "its index stage failed, written by an older version, or damaged "
                                                 "(the next run rebuilds it)."},
}


def create_app(output_dir: str | Path | None = None) -> FastAPI:
    """Build the app over ``output_dir`` (default: ``EMBEDDER_OUTPUT_DIR``).

    The app opens one store per process at start-up and shares it across
    requests and threads; the Edge store notices a newer published index by
    itself, so a run that re-indexes never disturbs a request.
    """
    root = Path(output_dir or resolve_run_config().output_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = open_service_store(root)
        try:
            yield
        finally:
            app.state.store.close()

    app = FastAPI(title="embedder search", version="0.1.0", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes each bad input back, and cannot encode NaN or infinity at all (a 500).
        # Name the field and what is wrong with it; never repeat what was sent.
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:300], "type": e.get("type", "")}
                  for e in exc.errors()[:20]]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        collections = sorted(p.parent.name for p in root.glob("*/processing_summary.json"))
        return {"status": "ok", "output_dir": str(root), "collections": collections}

    @app.get("/runs/{run_id}/summary", response_model=RunSummaries,
             responses={404: {"model": ErrorResponse, "description": "No collection summary carries that run id."}})
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

    @app.post("/search", response_model=SearchResponse, responses=_ERRORS)
    def search(req: SearchRequest, request: Request) -> SearchResponse:
        store = getattr(request.app.state, "store", None)
        try:
            return search_collection(root, req, store)
        except UnknownCollectionError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        except VectorIndexError as exc:  # none published, damaged, or the server unreachable
            raise HTTPException(status_code=503, detail=str(exc)) from exc
        except (SummaryValidationError, StageError) as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc

    return app


app = create_app()
