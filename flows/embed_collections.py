"""The `embed_collections` flow and its per-collection subflow."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.states import State

from embedder.errors import EmbedderError
from embedder.models.registry import get_spec, resolve_model
from embedder.report import (
    CollectionOutcome,
    build_summary,
    close_run_set,
    compute_quality,
    new_run_set,
    write_collection_summary,
)
from embedder.settings import CollectionInput, RunConfig, resolve_run_config
from embedder.summary import ProcessingSummary, render_summary_lines
from tasks.lease import ensure_gpu_limit
from tasks.stages import (
    call,
    dense_embed_task,
    export_task,
    fuse_task,
    index_task,
    load_collection_task,
    publish_task,
    rerank_task,
    sparse_infer_task,
)
from tasks.telemetry import artifact_key


def _run_name() -> str:
    params = flow_run.parameters or {}
    config = params.get("config") or {}
    cols = config.collections if isinstance(config, RunConfig) else config.get("collections", [])
    if not cols and params.get("config_file"):
        return f"embed-{Path(str(params['config_file'])).stem}"
    names = [c.name if isinstance(c, CollectionInput) else c.get("name", "?") for c in cols]
    label = ",".join(names) or "no-collections"
    return f"embed-{label[:60]}"


def _outcome(state: State) -> tuple[Any, str | None, bool]:
    """(result, error message, came-from-cache) of a finished task state."""
    if state.is_completed():
        return state.result(), None, state.name == "Cached"
    try:
        state.result()
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}", False
    return None, f"ended in state {state.name}", False


def preflight(config: RunConfig) -> None:
    """Fail before any GPU work on deterministic errors: unknown models, an unavailable dense model."""
    get_spec(config.rerank_model, "rerank")
    for name in config.sparse_models:
        get_spec(name, "sparse")
    resolve_model(config.dense_model, "dense", local_files_only=config.local_files_only)
    if not config.collections:
        raise EmbedderError("the run names no collections")


@flow(name="embed-collection", flow_run_name="embed-collection-{collection.name}", validate_parameters=True,
      persist_result=False, result_serializer="json")
def embed_collection(config: RunConfig, collection: CollectionInput, run_id: uuid.UUID) -> ProcessingSummary:
    """Load, embed, index, fuse, rerank and export one collection, then write its v4.1 summary."""
    log = get_run_logger()
    t0 = time.perf_counter()
    name = collection.name
    out = CollectionOutcome(collection=name, run_id=run_id)

    def outcome(stage: str, state: State) -> Any:
        result, err, was_cached = _outcome(state)
        if err:
            out.errors[stage] = err
            log.error("%s stage failed: %s", stage, err)
        if was_cached:
            out.cached.add(stage)
        return result

    # Everything this run publishes goes into one fresh run set, switched in at the end.
    run_path = new_run_set(config, name, run_id)
    try:
        out.load = call(load_collection_task, config, collection)  # a bad input path fails the run here
        out.dense = outcome("dense", call(dense_embed_task, config, name, out.load.chunks, return_state=True))
        if out.dense is not None:
            out.sparse = outcome("sparse", call(sparse_infer_task, config, name, out.load.chunks, run_id,
                                                return_state=True))
        if out.dense is not None and out.sparse is not None:
            out.index = outcome("index", index_task(config, name, out.load.chunks, out.dense, out.sparse, run_path,
                                                    return_state=True))
            out.fusion = outcome("fuse", call(fuse_task, config, name, out.dense, out.sparse, return_state=True))
        if out.fusion is not None:
            out.rerank = outcome("rerank", call(rerank_task, config, name, out.load.chunks, out.fusion, run_id,
                                                return_state=True))
        # The exports and the summary beside them describe the published index: when the index
        # could not be brought in line, the previous set stays as it is, whole.
        if out.dense is not None and out.sparse is not None and out.index is not None:
            out.exports = outcome("export", export_task(config, name, out.load, out.dense, out.sparse, out.rerank,
                                                        run_path, return_state=True)) or {}
        out.latency_seconds = time.perf_counter() - t0
        summary = build_summary(config, out, quality=compute_quality(config, out.fusion, out.rerank))
        path = write_collection_summary(summary, run_path)
        if summary.status != "failed":
            path = Path(outcome("publish", publish_task(config, name, run_path, return_state=True)) or path)
    finally:
        close_run_set(run_path)
    create_markdown_artifact(
        markdown="\n".join([f"# Collection `{name}`", "", "```", *render_summary_lines(summary), "```", "",
                            f"Summary: `{path}`"]),
        key=artifact_key("summary", name),
        description=f"processing summary of {name}",
    )
    if "publish" in out.errors:
        raise EmbedderError(f"collection {name!r}: its run set could not be published ({out.errors['publish']}); "
                            f"the previous one stays current; this run's summary is at {path}")
    if summary.status == "failed":
        failed = ", ".join(f"{stage} ({err})" for stage, err in out.errors.items()) or "see warnings"
        raise EmbedderError(f"collection {name!r} failed: {failed}; summary at {path}")
    return summary


@flow(name="embed-collections", flow_run_name=_run_name, validate_parameters=True, persist_result=False,
      result_serializer="json")
def embed_collections(
    config: RunConfig = RunConfig(),  # noqa: B008 - never mutated; a concrete default makes the UI show the form
    config_file: str | None = None,
) -> list[ProcessingSummary]:
    """Embed every collection in ``config``: one `embed-collection` subflow each.

    Args:
        config: The run's settings (the UI renders it as a form).
        config_file: A TOML/JSON settings file (scheduled deployments name their
            collections there); values set explicitly in ``config`` win over it.

    Collections run one after another: they would only queue on the single GPU
    slot if run side by side, and sequential runs keep memory bounded.
    """
    if config_file is not None:
        config = resolve_run_config(config_file, config.model_dump(exclude_unset=True))
    preflight(config)
    ensure_gpu_limit(config.gpu_concurrency_limit_name)
    run_id = uuid.UUID(flow_run.get_id()) if flow_run.get_id() else uuid.uuid4()
    return [embed_collection(config, collection, run_id) for collection in config.collections]
