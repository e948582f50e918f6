"""A run's collections fanned out as flow runs of the per-collection deployment.

Under a deployment, the parent flow submits each collection as its own flow run
(`run_deployment`), so the work pool places them on any worker of a fleet; it
then waits for every child, however each one ends, and rolls their summaries up.
A child's failure never cancels its siblings: each is an independent flow run.

The children find their inputs and write their outputs by path, so every worker
must see the run's input paths and output dir at the same paths (a shared
filesystem, or one machine).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_run_logger

from embedder.report import find_run_summary
from embedder.settings import CollectionInput, RunConfig
from embedder.summary import ProcessingSummary, load_summary
from tasks.telemetry import artifact_key

POLL_S = 2.0
# How often the parent logs which children it still waits for.
REPORT_S = 60.0


@dataclass
class ChildRun:
    """One collection's flow run and how it ended."""

    collection: str
    flow_run_id: uuid.UUID | None
    state: str
    summary: ProcessingSummary | None = None
    error: str | None = None

    def row(self) -> dict[str, Any]:
        """The roll-up table's row."""
        s = self.summary
        return {"collection": self.collection, "flow_run_id": str(self.flow_run_id or ""), "state": self.state,
                "status": s.status if s is not None else "none", "chunks": s.chunk_count if s is not None else 0,
                "hosts": ",".join(sorted({e.host for e in s.telemetry.lease_events if e.host})) if s else "",
                "error": self.error or ""}


def fan_out_to_deployments(config: RunConfig, deployment_id: str | None) -> bool:
    """Whether this run's collections go out as deployment runs (else in-process subflows).

    ``auto`` fans out only under a deployment (a worker's or ``serve``'s run),
    only when the run has more than one collection, and only when
    ``collection_deployment`` exists on the server. One collection has nothing
    to spread: as its own deployment run it would only wait for a worker's poll
    and a fresh process (7 s of an unchanged nightly run's 11 s here). A run of
    a deployment registered without it (a ``serve`` of ``manual`` alone, a
    partial ``prefect deploy``) runs its collections in-process, with a log
    line, rather than failing every collection on submission.
    """
    if config.orchestration.collection_fanout == "subflows":
        return False
    if config.orchestration.collection_fanout == "deployments":
        return True
    if deployment_id is None or len(config.collections) < 2:
        return False
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(config.orchestration.collection_deployment)
        except ObjectNotFound:
            get_run_logger().warning(
                "collection_fanout is auto but the deployment %r does not exist on this server: running the "
                "collections in-process (deploy it with `prefect deploy --all` or serve it with "
                "deployments/serve.py to spread them over workers)", config.orchestration.collection_deployment)
            return False
    return True


def _submit(config: RunConfig, collection: CollectionInput, run_id: uuid.UUID,
            preflight_error: str | None) -> Any:
    return run_deployment(
        name=config.orchestration.collection_deployment,
        parameters={"config": config.model_dump(mode="json"), "collection": collection.model_dump(mode="json"),
                    "run_id": str(run_id), "preflight_error": preflight_error, "run_warnings": config.warnings()},
        timeout=0,  # submit and return; the parent waits for all of them below
        as_subflow=True,  # the child shows under the parent in the UI
        flow_run_name=f"embed-collection-{collection.name}",
    )


def run_collection_deployments(config: RunConfig, run_id: uuid.UUID,
                               preflight_error: str | None) -> list[ChildRun]:
    """Submit every collection as a flow run of ``collection_deployment``, wait for all, read their summaries.

    Returns:
        One :class:`ChildRun` per collection, in the config's order: its flow run
        id, final state, the summary it published for ``run_id`` (None when it
        wrote none) and, unless it completed, the error to report.
    """
    log = get_run_logger()
    children: list[ChildRun] = []
    for collection in config.collections:
        try:
            child = _submit(config, collection, run_id, preflight_error)
            children.append(ChildRun(collection.name, child.id, "Scheduled"))
            log.info("collection %r submitted as flow run %s of %s", collection.name, child.id,
                     config.orchestration.collection_deployment)
        except Exception as exc:  # a missing deployment, an unreachable server: that collection fails, others go on
            children.append(ChildRun(collection.name, None, "NotSubmitted",
                                     error=f"collection {collection.name!r}: could not be submitted to "
                                     f"{config.orchestration.collection_deployment!r}: {type(exc).__name__}: {exc}"))
    pending = {c.flow_run_id: c for c in children if c.flow_run_id is not None}
    last_report = time.monotonic()
    with get_client(sync_client=True) as client:
        while pending:
            for fid, child in list(pending.items()):
                state = client.read_flow_run(fid).state
                if state is not None and state.is_final():
                    child.state = state.name or state.type.value
                    if not state.is_completed():
                        child.error = f"collection {child.collection!r}: flow run {fid} ended {state.name}" + (
                            f": {state.message}" if state.message else "")
                    del pending[fid]
            if pending:
                if time.monotonic() - last_report > REPORT_S:
                    last_report = time.monotonic()
                    log.info("waiting for %d collection flow run(s): %s", len(pending),
                             ", ".join(c.collection for c in pending.values()))
                time.sleep(POLL_S)
    for child in children:
        path = find_run_summary(config.output_dir, child.collection, run_id)
        if path is not None:
            child.summary = load_summary(path)
        elif child.error is None:
            child.error = f"collection {child.collection!r}: flow run {child.flow_run_id} wrote no summary"
    return children


def rollup_artifact(children: list[ChildRun]) -> None:
    """A table artifact on the parent run: each collection's flow run, state, status and hosts."""
    create_table_artifact(table=[c.row() for c in children], key=artifact_key("rollup", "collections"),
                          description="each collection's flow run and how it ended")
