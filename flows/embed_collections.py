"""The `embed_collections` flow and its per-collection subflow."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.runtime import deployment, flow_run

from embedder import startup
from embedder.cancel import stop_reason
from embedder.errors import CollectionsFailedError
from embedder.report import CollectionOutcome, build_summary, close_run_set, new_run_set, write_collection_summary
from embedder.settings import CollectionInput, RunConfig, resolve_limit_name, resolve_run_config
from embedder.summary import ProcessingSummary, render_summary_lines
from tasks.fanout import fan_out_to_deployments, rollup_artifact, run_collection_deployments
from tasks.lease import collection_lease, ensure_gpu_limit
from tasks.stages import (
    call,
    carry_forward_task,
    dense_embed_task,
    export_task,
    fuse_task,
    index_task,
    load_collection_task,
    preflight_task,
    publish_task,
    quality_task,
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


def outcome_error(state: State) -> str | None:
    """The error message of a finished task state, or None when it completed."""
    return _outcome(state)[1]


@flow(name="embed-collection", flow_run_name="embed-collection-{collection.name}", validate_parameters=True,
      persist_result=False, result_serializer="json")
def embed_collection(config: RunConfig, collection: CollectionInput, run_id: uuid.UUID,
                     preflight_error: str | None = None, run_warnings: list[str] | None = None) -> ProcessingSummary:
    """Load, embed, index, fuse, rerank and export one collection, then write and publish its v4.1 summary.

    Every run that starts publishes a summary. A failed one publishes it beside
    the last good run's exports and index (see `embedder.report.carry_forward`),
    then raises, so the subflow run ends Failed. One run at a time writes a
    collection of an output dir: a second one queues (see `tasks.lease.collection_lease`).

    ``run_warnings`` are the parent run's own (a fanned-out collection's config carries no record of
    how it was written), added to the summary's warnings.
    """
    with collection_lease(config.output_dir, collection.name, timeout_s=config.orchestration.collection_lock_timeout_s,
                          lease_duration_s=config.gpu.lease_duration_s) as lock:
        if lock.wait_s > 1:
            get_run_logger().info("waited %.1f s for another run of collection %r to finish", lock.wait_s,
                                  collection.name)
        return _embed_collection(config, collection, run_id, preflight_error, run_warnings or [])


def _embed_collection(config: RunConfig, collection: CollectionInput, run_id: uuid.UUID,
                      preflight_error: str | None, run_warnings: list[str]) -> ProcessingSummary:
    startup.mark(startup.FLOW)  # a collection's own flow run (fan-out) starts its process's clock here
    log = get_run_logger()
    t0 = time.perf_counter()
    name = collection.name
    out = CollectionOutcome(collection=name, run_id=run_id, warnings=list(run_warnings))

    def outcome(stage: str, state: State) -> Any:
        result, err, was_cached = _outcome(state)
        if err:
            out.errors[stage] = err
            log.error("%s stage failed: %s", stage, err)
        if was_cached:
            out.cached.add(stage)
        out.cancelled = out.cancelled or stop_reason()
        return result

    def going() -> bool:
        # A stop request (Ctrl-C, SIGTERM) ends the run after the stage it interrupted.
        out.cancelled = out.cancelled or stop_reason()
        return out.cancelled is None

    # Everything this run publishes goes into one fresh run set, switched in at the end.
    run_path = new_run_set(config, name, run_id)
    try:
        if preflight_error:
            out.errors["preflight"] = preflight_error
        elif going():
            out.load = outcome("load", call(load_collection_task, config, collection, healed=out.healed,
                                            return_state=True))
        if out.load is not None and out.load.chunk_count == 0:
            out.errors["load"] = "the collection holds no valid chunks (each record's reason is in rejects.jsonl)"
        if out.load is not None and not out.errors and going():
            # Sparse (CPU first) needs nothing from dense (GPU): they run side by side.
            sparse_run = (call(sparse_infer_task, config, name, out.load.chunks, run_id, submit=True, healed=out.healed)
                          if config.sparse.overlap else None)
            out.dense = outcome("dense", call(dense_embed_task, config, name, out.load.chunks, healed=out.healed,
                                              return_state=True))
            if sparse_run is not None:
                sparse_run.wait()
                out.sparse = outcome("sparse", sparse_run.state)
            elif out.dense is not None:
                out.sparse = outcome("sparse", call(sparse_infer_task, config, name, out.load.chunks, run_id,
                                                    healed=out.healed, return_state=True))
        if out.load is not None and out.dense is not None and out.sparse is not None and going():
            out.index = outcome("index", index_task(config, name, out.load.chunks, out.dense, out.sparse, run_path,
                                                    return_state=True))
            out.fusion = outcome("fuse", call(fuse_task, config, name, out.dense, out.sparse, healed=out.healed,
                                              return_state=True))
        if out.load is not None and out.fusion is not None and going():
            out.rerank = outcome("rerank", call(rerank_task, config, name, out.load.chunks, out.fusion, run_id,
                                                healed=out.healed, return_state=True))
        # The exports and the summary beside them describe the published index: when the index
        # could not be brought in line, this run's exports are not written at all.
        if out.dense is not None and out.sparse is not None and out.index is not None and going():
            out.exports = outcome("export", export_task(config, name, out.load, out.dense, out.sparse, out.rerank,
                                                        run_path, return_state=True)) or {}
        quality = outcome("quality", quality_task(config, out.fusion, out.rerank, return_state=True))
        out.latency_seconds = time.perf_counter() - t0
        summary = build_summary(config, out, quality=quality)
        if summary.status in ("failed", "cancelled"):
            carried = outcome("carry", carry_forward_task(config, name, run_path, out.load, return_state=True))
            out.exports, out.exports_run_id = carried if carried is not None else ({}, None)
            out.carried = carried is not None
            if carried is None:
                out.warnings.append("the last good exports and index could not be carried into this run's set; "
                                    "it is not published, the last good run set stays current")
            summary = build_summary(config, out, quality=quality)
        path = write_collection_summary(summary, run_path)
        if "carry" not in out.errors:  # a set missing the last good index must never be switched in
            path = Path(outcome("publish", publish_task(config, name, run_path, return_state=True)) or path)
    finally:
        close_run_set(run_path)
    create_markdown_artifact(
        markdown="\n".join([f"# Collection `{name}`", "", "```", *render_summary_lines(summary), "```", "",
                            f"Summary: `{path}`"]),
        key=artifact_key("summary", name),
        description=f"processing summary of {name}",
    )
    if "carry" in out.errors:
        raise CollectionsFailedError(
            f"collection {name!r} failed in {summary.failed_stage or 'a stage'}, and its run set could not carry the "
            f"last good exports and index ({out.errors['carry']}); the last good run set stays current; this "
            f"run's summary is at {path}", [summary])
    if "publish" in out.errors:
        raise CollectionsFailedError(
            f"collection {name!r}: its run set could not be published ({out.errors['publish']}); "
            f"the previous one stays current; this run's summary is at {path}", [summary])
    if summary.status == "cancelled":
        raise CollectionsFailedError(f"collection {name!r}: run stopped by {out.cancelled}"
                                     + (f" during {summary.failed_stage}" if summary.failed_stage else "")
                                     + f"; the last good run set stays current; summary at {path}", [summary])
    if summary.status == "failed":
        raise CollectionsFailedError(f"collection {name!r} failed in {summary.failed_stage}: "
                                     f"{out.errors.get(summary.failed_stage or '', 'see warnings')}; "
                                     f"summary at {path}", [summary])
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

    Under a deployment (``collection_fanout`` auto) with two or more collections,
    each collection is its own flow run of the per-collection deployment, so the
    work pool places them on any worker; this run waits for all of them and rolls
    their summaries up. Otherwise (the CLI, one collection) collections run one
    after another as in-process subflows: they would only queue on one GPU slot
    if run side by side, and sequential runs keep memory bounded. A failed collection never stops or
    cancels the others; the run ends Failed when any failed.

    Raises:
        CollectionsFailedError: When any collection failed (carrying every summary).
    """
    startup.mark(startup.FLOW)
    if config_file is not None:
        config = resolve_run_config(config_file, config.model_dump(exclude_unset=True))
    preflight_error = outcome_error(preflight_task(config, return_state=True))
    if preflight_error is None:
        ensure_gpu_limit(resolve_limit_name(config.gpu.concurrency_limit_name))
    run_id = uuid.UUID(flow_run.get_id()) if flow_run.get_id() else uuid.uuid4()
    summaries: list[ProcessingSummary] = []
    failures: list[str] = []
    if fan_out_to_deployments(config, deployment.id):
        children = run_collection_deployments(config, run_id, preflight_error)
        for child in children:
            summaries.extend([child.summary] if child.summary is not None else [])
            if child.error:
                failures.append(child.error)
        rollup_artifact(children)
    else:
        for collection in config.collections:
            if stop_reason():
                failures.append(f"collection {collection.name!r}: not started, the run was stopped by {stop_reason()}")
                continue
            state = embed_collection(config, collection, run_id, preflight_error, return_state=True)
            try:
                summaries.append(state.result())
            except CollectionsFailedError as exc:
                summaries.extend(exc.summaries)
                failures.append(str(exc))
            except Exception as exc:  # a crash before the collection's summary: still report it, go on
                failures.append(f"collection {collection.name!r}: {type(exc).__name__}: {exc}")
    if failures or not config.collections:
        raise CollectionsFailedError("; ".join(failures) or (preflight_error or "the run names no collections"),
                                     summaries)
    return summaries
