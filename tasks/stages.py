"""One thin Prefect task per pipeline stage.

Tasks take the run config and small file references and return small pydantic
results (persisted as JSON, never pickle). Their cache keys come from
``embedder.stages.*_key``: input digests, the output dir's stage store, model
fingerprints, stage settings and the code version, so a new flow run (or a
retry) skips every stage whose inputs did not change. The key also names the
stage's directory in the store; :func:`call` recomputes a stage (overwriting its
cache record) when that directory was pruned, so a record never outlives its files.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from embedder import stages as st
from embedder.errors import EmbedderError, ModelUnavailableError
from embedder.io.load import LoadResult
from embedder.schemas import StageTelemetry
from embedder.settings import CollectionInput, RunConfig, ServiceSettings, resolve_limit_name
from tasks.lease import gpu_lease
from tasks.telemetry import ProgressReporter, publish_stage

_PERSIST: dict[str, Any] = {"persist_result": True, "result_serializer": "json"}


def _transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry only errors that may pass: transport and store errors, never deterministic ones.

    Bad input, an unknown model, a layout the store cannot take: a retry would
    fail the same way, only later.
    """
    from embedder.errors import IndexLayoutError, VectorIndexError

    try:
        state.result()
    except EmbedderError as exc:
        return isinstance(exc, VectorIndexError) and not isinstance(exc, IndexLayoutError)
    except Exception:
        return True
    return False


_KEYS: dict[str, tuple[st.common.StageName, Callable[[dict[str, Any]], str]]] = {}


def _keyed(task_name: str, stage: st.common.StageName,
           key_fn: Callable[[dict[str, Any]], str]) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    # The key names the run's own stage store (see embedder.stages.store_id): a record can never
    # point into another output dir, and a deleted store comes back under new keys.
    _KEYS[task_name] = (stage, key_fn)

    def cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        return key_fn(parameters)

    return cache_key


def call(task_: Any, *args: Any, submit: bool = False, healed: list[dict[str, str]] | None = None,
         **kwargs: Any) -> Any:
    """Call a cached stage task; when its stage directory is gone, recompute and overwrite the record.

    The store prunes stage directories no retained run used; a later run with
    that input (a reverted file) must not be served a record whose files are gone.

    Args:
        submit: Start the task concurrently and return its future (``.wait()``, ``.state``).
        healed: Receives each damaged stage directory that was set aside (then recomputed).
    """
    stage, key_fn = _KEYS[task_.name]
    params = inspect.signature(task_.fn).bind(*args).arguments
    config, collection = params["config"], params["collection"]
    name = collection if isinstance(collection, str) else collection.name
    if not st.sealed(config, name, stage, key_fn(params), healed):
        task_ = task_.with_options(refresh_cache=True)
    return task_.submit(*args, **kwargs) if submit else task_(*args, **kwargs)


@task(name="load-validate",
      cache_key_fn=_keyed("load-validate", "load", lambda p: st.load_key(p["config"], p["collection"])),
      **_PERSIST)
def load_collection_task(config: RunConfig, collection: CollectionInput) -> LoadResult:
    """Prefect wrapper for `embedder.stages.load_stage`."""
    return st.load_stage(config, collection, st.load_key(config, collection))


@task(name="dense-embed", cache_key_fn=_keyed("dense-embed", "dense",
                                                     lambda p: st.dense_key(p["config"], p["collection"], p["chunks"])),
      **_PERSIST)
def dense_embed_task(config: RunConfig, collection: str, chunks: Any) -> st.DenseStageResult:
    """Prefect wrapper for `embedder.stages.dense_stage`; the GPU lease is held only while it embeds."""
    key = st.dense_key(config, collection, chunks)
    progress = _lazy_reporter(collection, "dense")
    result = st.dense_stage(
        config, collection, chunks, key, progress=progress,
        gpu=lambda: _gpu(config, "dense"),
    )
    publish_stage(collection, result.telemetry)
    return result


@task(name="sparse-infer",
      cache_key_fn=_keyed("sparse-infer", "sparse", lambda p: st.sparse_key(p["config"], p["collection"], p["chunks"])),
      **_PERSIST)
def sparse_infer_task(config: RunConfig, collection: str, chunks: Any, run_id: uuid.UUID) -> st.SparseStageResult:
    """Prefect wrapper for `embedder.stages.sparse_stage`; a model on the GPU runs inside the GPU lease."""
    reporters: dict[str, ProgressReporter] = {}

    def progress(model: str, done: int, total: int) -> None:
        stage = "sparse" if len(config.sparse.models) == 1 else f"sparse-{model}"
        if model not in reporters:
            reporters[model] = ProgressReporter(collection, stage)
        reporters[model](done, total)

    result = st.sparse_stage(
        config, collection, chunks, st.sparse_key(config, collection, chunks), run_id=run_id,
        gpu=lambda: _gpu(config, "sparse"),
        progress=progress,
    )
    for out in result.outputs:
        publish_stage(collection, out.telemetry, {"coverage_ratio": out.run.coverage_ratio})
    return result


def _lazy_reporter(collection: str, stage: str) -> Callable[[int, int], None]:
    # The progress artifact is created on the first step: a stage with nothing to do makes none.
    holder: list[ProgressReporter] = []

    def report(done: int, total: int) -> None:
        if not holder:
            holder.append(ProgressReporter(collection, stage))
        holder[0](done, total)

    return report


def _gpu(config: RunConfig, stage: str) -> Any:
    """The GPU lease for a stage, on the limit this host resolves (``gpu-{host}`` gives each host its own)."""
    return gpu_lease(resolve_limit_name(config.gpu.concurrency_limit_name), stage,
                     timeout_s=config.gpu.lease_timeout_s, lease_duration_s=config.gpu.lease_duration_s)


def open_run_store(config: RunConfig) -> Any:
    """The run's vector store: a Qdrant server when ``QDRANT_URL`` is set, else Qdrant Edge under the output dir.

    The URL and API key are read here from the environment, never passed as
    parameters: Prefect stores parameters, and the key is a secret.
    """
    from embedder.io.stores import open_store

    service = ServiceSettings()
    api_key = service.qdrant_api_key.get_secret_value() if service.qdrant_api_key else None
    return open_store(config.output_dir, url=service.qdrant_url, api_key=api_key, timeout_s=service.qdrant_timeout_s,
                      hnsw_min_points=config.index.hnsw_min_points)


@task(name="qdrant-index", retries=3, retry_delay_seconds=[1, 4, 10], retry_condition_fn=_transient, **_PERSIST)
def index_task(config: RunConfig, collection: str, chunks: Any, dense: st.DenseStageResult,
               sparse: st.SparseStageResult, run_path: str) -> st.IndexResult:
    """Prefect wrapper for `embedder.stages.index_stage`; I/O, so retried with backoff."""
    store = open_run_store(config)
    try:
        result = st.index_stage(config, collection, chunks, dense, sparse, store, run_path,
                                progress=_lazy_reporter(collection, "index"))
    finally:
        store.close()
    publish_stage(collection, StageTelemetry(stage="index", items=result.upserted, latency_ms=result.latency_ms,
                                             items_per_s=result.points_per_s, batch_size=result.batch_size,
                                             warnings=result.warnings))
    return result


@task(name="fuse",
      cache_key_fn=_keyed("fuse", "fuse", lambda p: st.fuse_key(p["config"], p["collection"], p["dense"], p["sparse"])),
      **_PERSIST)
def fuse_task(config: RunConfig, collection: str, dense: st.DenseStageResult,
              sparse: st.SparseStageResult) -> st.FusionResult:
    """Prefect wrapper for `embedder.stages.fuse_stage`."""
    return st.fuse_stage(config, collection, dense, sparse, st.fuse_key(config, collection, dense, sparse))


@task(name="rerank",
      cache_key_fn=_keyed("rerank", "rerank",
                          lambda p: st.rerank_key(p["config"], p["collection"], p["chunks"], p["fusion"])),
      **_PERSIST)
def rerank_task(config: RunConfig, collection: str, chunks: Any, fusion: st.FusionResult,
                run_id: uuid.UUID) -> st.RerankStageResult:
    """Prefect wrapper for `embedder.stages.rerank_stage`; the GPU lease is held only while it scores.

    An unavailable rerank model raises (so the failure is never cached); the flow
    records it as ``rerank_run.status: "error"`` and carries on.
    """
    key = st.rerank_key(config, collection, chunks, fusion)
    if not config.rerank.enabled or fusion.status != "executed":
        return st.rerank_stage(config, collection, chunks, fusion, key, run_id=run_id)
    result = st.rerank_stage(
        config, collection, chunks, fusion, key, run_id=run_id,
        gpu=lambda: _gpu(config, "rerank"))
    if result.status == "error":
        raise ModelUnavailableError(result.reason or "rerank model unavailable")
    if result.telemetry is not None:
        publish_stage(collection, result.telemetry)
    return result


@task(name="export", retries=2, retry_delay_seconds=[1, 4], retry_condition_fn=_transient)
def export_task(config: RunConfig, collection: str, load: LoadResult, dense: st.DenseStageResult | None,
                sparse: st.SparseStageResult | None, rerank: st.RerankStageResult | None,
                run_path: str) -> dict[str, str]:
    """Prefect wrapper for `embedder.report.write_exports` (into the run set)."""
    from embedder.report import write_exports

    return write_exports(config, collection, load, dense, sparse, rerank, run_path)


@task(name="publish", retries=2, retry_delay_seconds=[1, 4], retry_condition_fn=_transient)
def publish_task(config: RunConfig, collection: str, run_path: str) -> str:
    """Prefect wrapper for `embedder.report.publish_run_set`: one switch publishes exports, summary and index."""
    from embedder.report import publish_run_set

    return str(publish_run_set(config, collection, run_path))


@task(name="preflight")
def preflight_task(config: RunConfig) -> None:
    """Prefect wrapper for `embedder.preflight.preflight`: models, inputs, queries and qrels, before any GPU work."""
    from embedder.preflight import preflight

    preflight(config)


@task(name="quality")
def quality_task(config: RunConfig, fusion: st.FusionResult | None,
                 rerank: st.RerankStageResult | None) -> dict[str, dict[str, float]] | None:
    """Prefect wrapper for `embedder.report.compute_quality` (nDCG@10, Recall@100 per list, with qrels)."""
    from embedder.report import compute_quality

    return compute_quality(config, fusion, rerank)


@task(name="carry-forward")
def carry_forward_task(config: RunConfig, collection: str, run_path: str,
                       load: LoadResult | None) -> tuple[dict[str, str], str | None]:
    """Prefect wrapper for `embedder.report.carry_forward`: a failed run's set keeps the last good exports."""
    from embedder.report import carry_forward

    return carry_forward(config, collection, run_path, load)
