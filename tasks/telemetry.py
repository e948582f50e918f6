"""Prefect telemetry for stages: table artifacts, progress artifacts and events."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.events import emit_event
from prefect.exceptions import MissingContextError
from prefect.logging import get_logger, get_run_logger
from prefect.runtime import flow_run

from embedder.schemas import StageTelemetry

TABLE_COLUMNS = ("stage", "model", "device", "batch_size", "items", "latency_ms", "items_per_s", "gpu_peak_gb",
                 "fallback", "warnings")


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from parts (keys allow only lowercase letters, digits and dashes)."""
    raw = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in raw).strip("-")[:100]


def publish_stage(collection: str, telemetry: StageTelemetry, extra: dict[str, Any] | None = None) -> None:
    """One table artifact and one ``embedder.stage.completed`` event for a finished stage."""
    row = telemetry.model_dump()
    table = [{k: (round(row[k], 3) if isinstance(row[k], float) else
                  "; ".join(row[k]) if isinstance(row[k], list) else row[k]) for k in TABLE_COLUMNS}]
    create_table_artifact(table=table, key=artifact_key("stage", collection, telemetry.stage),
                          description=f"{telemetry.stage} stage of collection {collection}")
    payload = {**{k: row[k] for k in TABLE_COLUMNS}, "collection": collection, **(extra or {})}
    emit_event(
        event="embedder.stage.completed",
        resource={"prefect.resource.id": f"embedder.collection.{collection}.{telemetry.stage}",
                  "prefect.resource.name": f"{collection}/{telemetry.stage}"},
        related=[{"prefect.resource.id": f"prefect.flow-run.{flow_run.get_id()}",
                  "prefect.resource.role": "flow-run"}] if flow_run.get_id() else None,
        payload=payload,
    )


ProgressListener = Callable[[str, str, int, int], None]
_LISTENERS: list[ProgressListener] = []


def add_progress_listener(listener: ProgressListener) -> None:
    """Also send every progress step to ``listener(collection, stage, done, total)`` (the CLI's progress bar)."""
    _LISTENERS.append(listener)


def remove_progress_listener(listener: ProgressListener) -> None:
    """Stop sending progress to ``listener``."""
    if listener in _LISTENERS:
        _LISTENERS.remove(listener)


class ProgressReporter:
    """Progress of a long stage: a Prefect progress artifact (every 5%, at most every 2 s), listeners, and a log line
    every few seconds.

    The log line is what a terminal without a progress bar (a worker, a CI log,
    the UI's log view) sees; it is skipped while a listener draws a bar.
    """

    def __init__(self, collection: str, stage: str, *, log_every_s: float = 5.0,
                 artifact_every_s: float = 2.0) -> None:
        self.collection, self.stage, self.log_every_s = collection, stage, log_every_s
        # Each update is an API call (tens of ms): on a stage of a few seconds, one per 5% cost a
        # third of the stage (bench/stages.py, sparse), so updates are also spaced in time.
        self.artifact_every_s = artifact_every_s
        self._updated = time.monotonic()
        # Called from sync code, Prefect's sync_compatible returns the id itself, never a coroutine.
        self.artifact_id: UUID = create_progress_artifact(  # type: ignore[assignment]
            progress=0.0, key=artifact_key("progress", collection, stage),
            description=f"{stage} progress for {collection}",
        )
        self._last = 0.0
        self._logged = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        now = time.monotonic()
        if done == total or (pct - self._last >= 5.0 and now - self._updated >= self.artifact_every_s):
            update_progress_artifact(artifact_id=self.artifact_id, progress=pct)
            self._last, self._updated = pct, now
        for listener in list(_LISTENERS):
            listener(self.collection, self.stage, done, total)
        if not _LISTENERS and (now - self._logged >= self.log_every_s or done == total):
            self._logged = now
            _logger().info("%s %s: %d/%d (%.0f%%)", self.collection, self.stage, done, total, pct)


def _logger() -> Any:
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("embedder.progress")
