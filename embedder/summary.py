"""processing_summary.json: the typed v4.1 run summary, v4.0 normalisation, and its CLI rendering."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from embedder.errors import SummaryValidationError
from embedder.io.atomic import atomic_write_text
from embedder.schemas import CrossEncoderRerankRun, SparseInferenceRun

CURRENT_VERSION = "v4.1"
LEGACY_VERSIONS = ("v4.0",)
SUPPORTED_VERSIONS = (CURRENT_VERSION, *LEGACY_VERSIONS)

StageStatus = Literal["executed", "disabled", "skipped", "error"]


class _Section(BaseModel):
    # Additive fields are part of the contract: older readers ignore them, so keep them.
    model_config = ConfigDict(extra="allow")


class FeatureToggles(_Section):
    enable_rerank: bool
    enable_sparse: bool
    sparse_models: list[str] = Field(default_factory=list)
    sources: dict[str, str] = Field(default_factory=dict)


class DenseRun(_Section):
    model_name: str
    device: str
    batch_size: int
    total_embeddings_generated: int
    latency_ms: float
    gpu_peak_gb: float
    status: StageStatus = "executed"
    reused: int = Field(0, description="Chunk vectors reused from earlier runs (same text, same model).")


class SparseVectorsStats(_Section):
    total: int = 0
    available: int = 0
    coverage_ratio: float = 0.0


class SparseRun(_Section):
    enabled: bool
    executed: bool
    status: StageStatus
    model_names: list[str] = Field(default_factory=list)
    fallback_used: bool = False
    vectors: SparseVectorsStats = Field(default_factory=SparseVectorsStats)
    payload: SparseInferenceRun | None = None
    reason: str | None = None
    computed: dict[str, int] = Field(default_factory=dict, description="Model -> chunk vectors computed.")
    reused: dict[str, int] = Field(default_factory=dict, description="Model -> chunk vectors reused.")


class RerankRun(_Section):
    enabled: bool
    executed: bool
    status: StageStatus
    model_name: str | None = None
    device: str | None = None
    top_k_candidates: int | None = None
    rerank_top_k: int | None = None
    payload: list[CrossEncoderRerankRun] = Field(default_factory=list)
    reason: str | None = None


class FusionRun(_Section):
    method: str
    k: int | None = None
    queries: int = 0
    latency_ms: float = 0.0
    status: StageStatus = "executed"
    reason: str | None = None


class Compatibility(_Section):
    current: str = CURRENT_VERSION
    legacy: list[str] = Field(default_factory=lambda: list(LEGACY_VERSIONS))


class LeaseEvent(_Section):
    stage: str
    limit_name: str
    requested_at: str
    acquired_at: str
    released_at: str
    wait_s: float
    lease_id: str | None = None
    recovery: Literal["prefect", "embedder"] | None = Field(
        None, description="What frees the slot if the holder dies: prefect (a running server's lease "
        "repossession) or embedder (its recovery on the ephemeral server, by lease id, once the pid is gone).")


class Telemetry(_Section):
    lease_events: list[LeaseEvent] = Field(default_factory=list)
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict)


class GpuBaseline(_Section):
    soft_limit_gb: float
    peak_memory_used_gb: float
    soft_limit_exceeded: bool


class SystemBaseline(_Section):
    peak_memory_gb: float


class PerformanceBaseline(_Section):
    latency_seconds: float
    gpu: GpuBaseline
    system: SystemBaseline


class RejectsInfo(_Section):
    count: int = 0
    path: str | None = None


class ProcessingSummary(_Section):
    """The per-collection run summary. v4.0 files validate after :func:`normalize_processing_summary`."""

    schema_version: Literal["v4.0", "v4.1"] = CURRENT_VERSION
    generated_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    collection: str
    chunk_count: int = Field(ge=0)
    run_id: uuid.UUID | None = None
    status: Literal["completed", "partial", "failed"] | None = None
    feature_toggles: FeatureToggles | None = None
    dense_run: DenseRun | None = None
    sparse_run: SparseRun | None = None
    rerank_run: RerankRun | None = None
    fusion_run: FusionRun | None = None
    model_fingerprints: dict[str, str] = Field(
        default_factory=dict, description="Model name -> sha256 of its files (or its hub id when not local).")
    index_run: dict[str, Any] | None = None
    compatibility: Compatibility = Field(default_factory=Compatibility)
    telemetry: Telemetry = Field(default_factory=Telemetry)
    performance_baseline: PerformanceBaseline | None = None
    quality: dict[str, dict[str, float]] | None = None
    rejects: RejectsInfo = Field(default_factory=RejectsInfo)
    exports: dict[str, str] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)


_V41_REQUIRED = ("run_id", "feature_toggles", "dense_run")


def normalize_processing_summary(data: dict[str, Any]) -> dict[str, Any]:
    """Return a defensive, normalised copy of a summary dict. The input is never mutated.

    A v4.0 summary gets the default ``telemetry``, ``compatibility`` and
    ``warnings`` sections so that v4.0 and v4.1 files validate alike.

    Args:
        data: A parsed processing_summary.json.

    Returns:
        A deep copy with the defaults filled in.

    Raises:
        SummaryValidationError: If it is not a dict or names an unsupported version.
    """
    if not isinstance(data, dict):
        raise SummaryValidationError(f"a processing summary must be a JSON object, not {type(data).__name__}")
    out = copy.deepcopy(data)
    version = out.get("schema_version")
    if version not in SUPPORTED_VERSIONS:
        raise SummaryValidationError(
            f"schema_version {version!r} is not supported; supported versions: {', '.join(SUPPORTED_VERSIONS)}"
        )
    if not isinstance(out.get("telemetry"), dict):
        out["telemetry"] = Telemetry().model_dump()
    if not isinstance(out.get("compatibility"), dict):
        out["compatibility"] = {"current": CURRENT_VERSION, "legacy": list(LEGACY_VERSIONS)}
    if not isinstance(out.get("warnings"), list):
        out["warnings"] = []
    return out


def validate_summary(data: Any) -> ProcessingSummary:
    """Validate a parsed summary (v4.0 or v4.1) and return the typed model.

    Raises:
        SummaryValidationError: Naming the first failing field.
    """
    normalised = normalize_processing_summary(data)
    if normalised["schema_version"] == CURRENT_VERSION:
        missing = [key for key in _V41_REQUIRED if key not in normalised]
        if missing:
            raise SummaryValidationError(f"v4.1 summary is missing required field(s): {', '.join(missing)}")
    try:
        return ProcessingSummary.model_validate(normalised)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        raise SummaryValidationError(
            f"invalid summary field '{loc}': {first['msg']} ({exc.error_count()} error(s) in all)"
        ) from exc


def load_summary(path: str | Path) -> ProcessingSummary:
    """Read and validate a processing_summary.json (v4.0 or v4.1).

    Raises:
        SummaryValidationError: If the file is missing, not JSON, or invalid.
    """
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SummaryValidationError(f"{p}: no such file") from exc
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise SummaryValidationError(f"{p}: not a readable UTF-8 JSON file ({exc})") from exc
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SummaryValidationError(f"{p}: not valid JSON ({exc})") from exc
    return validate_summary(data)


def write_summary(summary: ProcessingSummary, path: str | Path) -> Path:
    """Write the summary atomically (temp file + rename): readers see the old file or the new one."""
    text = summary.model_dump_json(indent=2, exclude_none=False) + "\n"
    return atomic_write_text(Path(path), text)


def render_summary_lines(summary: ProcessingSummary) -> list[str]:
    """Human-readable lines for ``embed-collections summary``. Absent sections are not printed.

    Dense lines come first; sparse and rerank lines are appended after them.
    """
    s = summary
    lines = [
        f"Collection: {s.collection}  (schema {s.schema_version}, {s.chunk_count} chunks)",
        f"Generated: {s.generated_at}",
    ]
    if s.run_id:
        lines.append(f"Run: {s.run_id}" + (f"  status={s.status}" if s.status else ""))
    if s.dense_run:
        d = s.dense_run
        lines.append(
            f"Dense: {d.model_name} on {d.device}, batch {d.batch_size}, {d.total_embeddings_generated} vectors "
            f"computed, {d.reused} reused, {d.latency_ms:.0f} ms, GPU peak {d.gpu_peak_gb:.2f} GB [{d.status}]"
        )
    if s.sparse_run:
        sp = s.sparse_run
        line = f"Sparse: {', '.join(sp.model_names) or '-'} [{sp.status}]"
        if sp.computed or sp.reused:
            line += ", " + ", ".join(f"{m}: {sp.computed.get(m, 0)} computed, {sp.reused.get(m, 0)} reused"
                                     for m in sp.model_names)
        if sp.executed:
            line += (
                f", fallback {'yes' if sp.fallback_used else 'no'}, "
                f"coverage {sp.vectors.available}/{sp.vectors.total} ({sp.vectors.coverage_ratio:.2%})"
            )
            if sp.payload:
                line += f", {sp.payload.latency_ms:.0f} ms"
        elif sp.reason:
            line += f": {sp.reason}"
        lines.append(line)
    if s.fusion_run:
        f = s.fusion_run
        line = f"Fusion: {f.method}" + (f" (k={f.k})" if f.k is not None else "") + f" [{f.status}]"
        line += f", {f.queries} queries, {f.latency_ms:.0f} ms" if f.status == "executed" else ""
        if f.reason:
            line += f": {f.reason}"
        lines.append(line)
    if s.rerank_run:
        r = s.rerank_run
        line = f"Rerank: {r.model_name or '-'} [{r.status}]"
        if r.executed and r.payload:
            batch = max(p.batch_size for p in r.payload)
            latency = sum(p.latency_ms for p in r.payload)
            peak = max(p.gpu_peak_gb for p in r.payload)
            line += (
                f" on {r.device}, batch {batch}, {len(r.payload)} queries, top {r.rerank_top_k} of "
                f"{r.top_k_candidates}, {latency:.0f} ms, GPU peak {peak:.2f} GB"
            )
        elif r.reason:
            line += f": {r.reason}"
        lines.append(line)
    if s.index_run:
        ir = s.index_run
        line = f"Index: {ir.get('backend', 'qdrant')} {ir.get('location', '')} points={ir.get('points_count', '?')}"
        if ir.get("points_per_s"):
            line += f", {ir['points_per_s']:.0f} points/s, {ir.get('search_mode') or '?'} search"
        lines.append(f"{line} [{ir.get('status', '?')}]")
    if s.quality:
        for name, metrics in s.quality.items():
            figures = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "queries")
            queries = f" ({int(metrics['queries'])} queries)" if "queries" in metrics else ""
            lines.append(f"Quality {name}: {figures}{queries}")
    if s.performance_baseline:
        pb = s.performance_baseline
        lines.append(
            f"Performance: {pb.latency_seconds:.2f} s, GPU peak {pb.gpu.peak_memory_used_gb:.2f}/"
            f"{pb.gpu.soft_limit_gb:.1f} GB, RSS peak {pb.system.peak_memory_gb:.2f} GB"
        )
    if s.telemetry.lease_events:
        waits = ", ".join(f"{e.stage} waited {e.wait_s:.2f}s" for e in s.telemetry.lease_events)
        lines.append(f"GPU lease: {waits}")
    if s.rejects.count:
        lines.append(f"Rejects: {s.rejects.count} -> {s.rejects.path}")
    for warning in s.warnings:
        lines.append(f"WARNING: {warning}")
    return lines
