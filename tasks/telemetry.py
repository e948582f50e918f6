"""Prefect telemetry for stages: table artifacts, progress artifacts and events."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.events import emit_event
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


class ProgressReporter:
    """A Prefect progress artifact updated as a long stage advances (at most every 5%)."""

    def __init__(self, collection: str, stage: str) -> None:
        self.artifact_id = create_progress_artifact(
            progress=0.0, key=artifact_key("progress", collection, stage),
            description=f"{stage} progress for {collection}",
        )
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        if pct - self._last >= 5.0 or done == total:
            update_progress_artifact(artifact_id=self.artifact_id, progress=pct)
            self._last = pct
