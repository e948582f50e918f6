"""processing_summary.json: the typed v4.1 run summary, v4.0 normalisation, and its CLI rendering."""

from __future__ import annotations

import copy
import json
import re
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
_VERSION = re.compile(r"^v(\d+)\.(\d+)$")

# The top-level keys every summary we write carries (DESIGN.md); `quality` only with qrels.
CONTRACT_KEYS = ("schema_version", "generated_at", "collection", "chunk_count", "run_id", "feature_toggles",
                 "dense_run", "sparse_run", "rerank_run", "fusion_run", "compatibility", "telemetry",
                 "performance_baseline", "rejects", "warnings")

StageStatus = Literal["executed", "disabled", "skipped", "error"]


class _Section(BaseModel):
    # Read leniently: unknown keys (older or newer writers, other tools) are kept, never dropped.
    # Our own writes are checked strictly by `validate_strict`, which rejects them.
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
    latency_ms: float | None = Field(None, description="None when the writer did not record it.")
    gpu_peak_gb: float | None = None
    status: StageStatus = "executed"
    reused: int = Field(0, description="Chunk vectors reused from earlier runs (same text, same model).")
    initial_batch_size: int | None = None
    backoffs: list[int] = Field(default_factory=list, description="Batch budgets that hit OOM, in order: padded "
                                "tokens under the tokens policy, rows under the items policy.")
    items_per_s: float | None = None
    cached: bool = False
    reason: str | None = None
    precision: str | None = Field(None, description="fp32, fp16 or bf16.")
    torch_peak_gb: float | None = Field(None, description="torch's allocated peak; gpu_peak_gb is the device figure.")
    components: list[dict[str, Any]] = Field(
        default_factory=list, description="A blended dense vector (dense_blend): per model its weight, vectors "
        "computed and reused, device and precision. Empty for one model.")


class SparseVectorsStats(_Section):
    total: int = 0
    available: int = 0
    coverage_ratio: float = 0.0


class SparsePayload(_Section):
    """A `SparseInferenceRun` as read (older writers recorded less; ours validate as the full record)."""

    run_id: str | None = None
    sparse_model: str | None = None
    query_sparse_vector: dict[str, Any] | None = None
    document_sparse_vectors: list[dict[str, Any]] | dict[str, Any] = Field(default_factory=list)
    latency_ms: float | None = None
    fallback_used: bool = False
    fallback_count: int = 0
    coverage_ratio: float | None = None


class SparseRun(_Section):
    enabled: bool
    executed: bool | None = None
    status: StageStatus | None = None
    model_names: list[str] = Field(default_factory=list)
    fallback_used: bool = False
    vectors: SparseVectorsStats = Field(default_factory=SparseVectorsStats)
    payload: SparsePayload | None = None
    payloads: list[SparsePayload] = Field(default_factory=list, description="Payloads of the further models.")
    reason: str | None = None
    cached: bool = False
    computed: dict[str, int] = Field(default_factory=dict, description="Model -> chunk vectors computed.")
    reused: dict[str, int] = Field(default_factory=dict, description="Model -> chunk vectors reused.")


class RerankPayload(_Section):
    """A `CrossEncoderRerankRun` as read (older writers recorded less; ours validate as the full record)."""

    run_id: str | None = None
    query: str | None = None
    query_id: str | None = None
    candidate_ids: list[str] = Field(default_factory=list)
    batch_size: int | None = None
    scores: list[float] = Field(default_factory=list)
    latency_ms: float | None = None
    gpu_peak_gb: float | None = None
    candidates_dropped: int = 0


class RerankRun(_Section):
    enabled: bool
    executed: bool
    status: StageStatus
    model_name: str | None = None
    device: str | None = None
    top_k_candidates: int | None = None
    rerank_top_k: int | None = None
    payload: list[RerankPayload] = Field(default_factory=list)
    reason: str | None = None
    cached: bool = False


class FusionRun(_Section):
    method: str
    k: int | None = None
    queries: int = 0
    latency_ms: float = 0.0
    status: StageStatus = "executed"
    reason: str | None = None
    lists: list[str] | None = Field(None, description="The fused lists: dense, then each sparse model.")
    weights: dict[str, float] | None = Field(None, description="Per-list weights applied (None: all 1).")
    candidates_path: str | None = Field(None, description="Each query's candidate lists (the stage file).")


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
    host: str | None = Field(None, description="The host that held the slot (EMBEDDER_HOST or its host name).")
    held_s: float | None = Field(None, description="How long the slot was held (acquired to released).")
    gpu_work_s: float | None = Field(None, description="How much of that the stage spent on GPU work.")
    recovery: Literal["prefect", "embedder"] | None = Field(
        None, description="What frees the slot if the holder dies: prefect (a running server's lease "
        "repossession) or embedder (its recovery on the ephemeral server, by lease id, once the pid is gone).")


class StartupTelemetry(_Section):
    """The run's fixed cost outside its stages; None where this process could not tell."""

    process_to_flow_s: float | None = Field(None, description="From the process's start (to the second) to the "
                                            "flow's first line: imports, the Prefect server, the flow run's creation.")
    imports_s: float | None = Field(None, description="From the process's start to the CLI command's first line.")
    server_start_s: float | None = Field(None, description="Starting the temporary Prefect server (the CLI, when no "
                                         "PREFECT_API_URL names one).")
    flow_s: float | None = Field(None, description="From the flow's first line to this summary: every stage, "
                                 "model loads and Prefect's own bookkeeping included.")
    warm_runner: bool | None = Field(None, description="Whether the warm runner of `embed-collections server` ran "
                                     "it (Prefect imported and the preloaded models in memory already); the process "
                                     "times then count from the runner's fork.")


class Telemetry(_Section):
    lease_events: list[LeaseEvent] = Field(default_factory=list)
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict)
    startup: StartupTelemetry | None = Field(None, description="Where the run's time went outside its stages.")


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


class Integrity(_Section):
    """What this run's checks of the files it kept found, and what it healed."""

    files_checked: int = Field(0, description="Kept files checked before they were trusted: vector-store parts the "
                               "stages opened, and the published index's files.")
    damaged: int = Field(0, description="Kept files (or stage directories) that failed a check: a checksum, a "
                         "Parquet footer or page checksum, a vector's values, an index read-back.")
    quarantined: list[dict[str, str]] = Field(
        default_factory=list, description="Each damaged vector-store part or stage directory: stage, file (where it "
        "was set aside under .stages/quarantine/) and reason. What it held was computed again.")
    rebuilt: list[dict[str, str]] = Field(
        default_factory=list, description="Each derived store rebuilt because it was damaged: what (the index), "
        "reason, and the build that replaced it.")


class IndexProof(_Section):
    sampled: int = Field(0, description="Points read back from the index (a reservoir sample).")
    mismatched: int = Field(0, description="Of those, points whose vectors differ from the stored ones.")


class IndexIntegrity(_Section):
    """The index stage's checks of the published index before it trusted it, and its read-back proof."""

    checked: int = Field(0, description="Shard files checked against their checksums.")
    damaged: list[dict[str, str]] = Field(default_factory=list, description="Each damaged file: file, reason.")
    rebuilt: str | None = Field(None, description="Why the shard was rebuilt from the stored vectors (None: it "
                                "was not).")
    proof: IndexProof = Field(default_factory=IndexProof)


class IndexRun(_Section):
    """What the index stage did (``index_run``)."""

    status: StageStatus | None = None
    backend: str = "edge"
    location: str = ""
    collection: str = ""
    action: Literal["rebuilt", "incremental", "unchanged"] | None = Field(
        None, description="rebuilt: a new index from every point; incremental: only what changed was written; "
        "unchanged: the published index already held exactly these points.")
    points_count: int = Field(0, description="Points read back from the published index.")
    upserted: int = Field(0, description="New and changed points written.")
    deleted: int = Field(0, description="Points of chunks that are gone, removed after the upserts succeeded.")
    unchanged: int = Field(0, description="Points the published index already held as they are.")
    latency_ms: float = 0.0
    points_per_s: float = 0.0
    batch_size: int = 0
    search_mode: str | None = Field(None, description="exact (brute force), hnsw (graph built) or server.")
    hnsw_build_s: float = 0.0
    build_id: str | None = None
    segments: int | None = Field(None, description="Segments of the published index, where the store reports "
                                 "them (Edge builds a large shard's graph a segment at a time).")
    integrity: IndexIntegrity = Field(default_factory=IndexIntegrity)
    warnings: list[str] = Field(default_factory=list)
    reason: str | None = None


class ProcessingSummary(_Section):
    """The per-collection run summary, as written (v4.1) or as read from any v4.x writer after normalisation."""

    schema_version: str = CURRENT_VERSION
    generated_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    collection: str
    chunk_count: int = Field(ge=0)
    run_id: uuid.UUID | None = None
    status: Literal["completed", "partial", "failed", "cancelled"] | None = Field(
        None, description="completed, partial (an optional stage degraded), failed, or cancelled (stopped on "
        "request, SIGINT or SIGTERM, before it finished: like failed, the last good run set stays current).")
    failed_stage: str | None = Field(None, description="The stage that failed the collection, when it failed.")
    exports_run_id: uuid.UUID | None = Field(
        None, description="The run whose exports and index sit beside this summary, when not this run's own "
        "(a failed run leaves the last good run's in place).")
    feature_toggles: FeatureToggles | None = None
    dense_run: DenseRun | None = None
    sparse_run: SparseRun | None = None
    rerank_run: RerankRun | None = None
    fusion_run: FusionRun | None = None
    model_fingerprints: dict[str, str] = Field(
        default_factory=dict, description="Model name -> sha256 of its files (or its hub id when not local).")
    index_run: IndexRun | None = None
    compatibility: Compatibility = Field(default_factory=Compatibility)
    telemetry: Telemetry = Field(default_factory=Telemetry)
    performance_baseline: PerformanceBaseline | None = None
    quality: dict[str, dict[str, float]] | None = None
    rejects: RejectsInfo = Field(default_factory=RejectsInfo)
    exports: dict[str, str] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    integrity: Integrity | None = Field(None, description="The checks of kept files this run made, and what "
                                        "it healed (a damaged part is set aside and recomputed).")


def parse_version(version: Any) -> tuple[int, int]:
    """``"v4.1"`` -> ``(4, 1)``.

    Raises:
        SummaryValidationError: If it is not a ``vMAJOR.MINOR`` string.
    """
    m = _VERSION.match(version) if isinstance(version, str) else None
    if m is None:
        raise SummaryValidationError(
            f"schema_version {version!r} is not a version this reader knows (expected v4.x; this reader writes "
            f"{CURRENT_VERSION} and reads {', '.join(LEGACY_VERSIONS)})")
    return int(m.group(1)), int(m.group(2))


def _normalise_origin_shapes(out: dict[str, Any]) -> None:
    """Map the earlier pipeline's shapes onto ours in place, keeping every original key.

    See ``fixtures/origin-summaries/README.md`` in the shared project files.
    """
    dense = out.get("dense_run")
    if isinstance(dense, dict):
        models = dense.get("models_executed")
        if "model_name" not in dense and isinstance(models, list) and models:
            dense["model_name"] = ", ".join(str(m) for m in models)
        latency = dense.get("latency_seconds")
        if "latency_ms" not in dense and isinstance(latency, int | float):
            dense["latency_ms"] = float(latency) * 1000
    rerank = out.get("rerank_run")
    if isinstance(rerank, dict):
        payload = rerank.get("payload")
        if isinstance(payload, dict):  # one object, not a list
            rerank["payload"] = [payload]
        for p in rerank.get("payload") or []:
            if isinstance(p, dict) and p.get("run_id") is not None:
                p["run_id"] = str(p["run_id"])
            for key in ("top_k_candidates", "rerank_top_k"):
                if isinstance(p, dict) and key in p and rerank.get(key) is None:
                    rerank[key] = p[key]
        state = rerank.get("device_state")
        if rerank.get("device") is None and isinstance(state, dict) and state.get("resolved"):
            rerank["device"] = str(state["resolved"])
        if "executed" not in rerank and "status" in rerank:
            rerank["executed"] = rerank["status"] == "executed"
    sparse = out.get("sparse_run")
    if isinstance(sparse, dict):
        if "enabled" in sparse and not sparse["enabled"] and "status" not in sparse:
            sparse["status"] = "disabled"
        for p in [sparse.get("payload"), *(sparse.get("payloads") or [])]:
            if isinstance(p, dict) and p.get("run_id") is not None:
                p["run_id"] = str(p["run_id"])
    toggles = out.get("feature_toggles")
    if isinstance(toggles, dict) and "sources" not in toggles and isinstance(toggles.get("provenance"), dict):
        toggles["sources"] = {k: str(v) for k, v in toggles["provenance"].items()}


def normalize_processing_summary(data: dict[str, Any]) -> dict[str, Any]:
    """Return a defensive, normalised copy of a summary dict. The input is never mutated.

    Any v4.x summary is accepted: a v4.0 one gets the default ``telemetry``,
    ``compatibility`` and ``warnings`` sections, and the shapes the earlier
    pipeline wrote (``models_executed``, a single rerank payload object, no
    ``run_id``, ``provenance``) are mapped onto ours. Unknown keys are kept.

    Args:
        data: A parsed processing_summary.json.

    Returns:
        A deep copy with the defaults filled in.

    Raises:
        SummaryValidationError: If it is not a dict, or names a major version other than 4.
    """
    if not isinstance(data, dict):
        raise SummaryValidationError(f"a processing summary must be a JSON object, not {type(data).__name__}")
    out = copy.deepcopy(data)
    major, _minor = parse_version(out.get("schema_version"))
    if major != 4:
        raise SummaryValidationError(
            f"schema_version {out['schema_version']!r} is a major version this reader does not know; it reads v4.x")
    if not isinstance(out.get("telemetry"), dict):
        out["telemetry"] = Telemetry().model_dump(exclude_none=True)
    if not isinstance(out.get("compatibility"), dict):
        out["compatibility"] = {"current": CURRENT_VERSION, "legacy": list(LEGACY_VERSIONS)}
    if not isinstance(out.get("warnings"), list):
        out["warnings"] = []
    _normalise_origin_shapes(out)
    return out


def _first_error(exc: ValidationError, prefix: str = "") -> str:
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in (*([prefix] if prefix else []), *first["loc"]))
    return f"invalid summary field '{loc}': {first['msg']} ({exc.error_count()} error(s) in all)"


def validate_summary(data: Any) -> ProcessingSummary:
    """Validate a parsed summary of any v4.x writer, leniently, and return the typed model.

    Raises:
        SummaryValidationError: Naming the first failing field.
    """
    normalised = normalize_processing_summary(data)
    try:
        return ProcessingSummary.model_validate(normalised)
    except ValidationError as exc:
        raise SummaryValidationError(_first_error(exc)) from exc


def _unknown_keys(model: BaseModel, path: str) -> list[str]:
    found = [f"{path}.{k}" if path else k for k in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, _Section):
                where = f"{path}.{name}" if path else name
                found += _unknown_keys(item, f"{where}[{i}]" if isinstance(value, list) else where)
    return found


def validate_strict(data: Any) -> ProcessingSummary:
    """Validate a summary as this version writes it: v4.1, every contract key, no unknown keys in typed sections.

    Rerank and sparse payloads must be whole ``CrossEncoderRerankRun`` and
    ``SparseInferenceRun`` records. Our own summaries pass this before they are written.

    Raises:
        SummaryValidationError: Naming the first problem.
    """
    if not isinstance(data, dict):
        raise SummaryValidationError(f"a processing summary must be a JSON object, not {type(data).__name__}")
    if data.get("schema_version") != CURRENT_VERSION:
        raise SummaryValidationError(f"strict: schema_version must be {CURRENT_VERSION!r}, "
                                     f"not {data.get('schema_version')!r}")
    missing = [k for k in CONTRACT_KEYS if k not in data]
    if missing:
        raise SummaryValidationError(f"strict: missing contract key(s): {', '.join(missing)}")
    try:
        summary = ProcessingSummary.model_validate(data)
    except ValidationError as exc:
        raise SummaryValidationError(_first_error(exc)) from exc
    unknown = _unknown_keys(summary, "")
    if unknown:
        raise SummaryValidationError(f"strict: unknown key(s) (misspelt?): {', '.join(unknown)}")
    if summary.run_id is None:
        raise SummaryValidationError("strict: run_id must be a UUID")
    checks: list[tuple[str, type[BaseModel], Any]] = []
    if summary.rerank_run:
        checks += [(f"rerank_run.payload[{i}]", CrossEncoderRerankRun, p) for i, p in
                   enumerate(data["rerank_run"].get("payload") or [])]
    if summary.sparse_run and data["sparse_run"].get("payload") is not None:
        checks.append(("sparse_run.payload", SparseInferenceRun, data["sparse_run"]["payload"]))
    for where, record, value in checks:
        try:
            # A null means "not recorded" in our lenient section models: the record's own default applies.
            record.model_validate({k: v for k, v in value.items() if v is not None} if isinstance(value, dict)
                                  else value)
        except ValidationError as exc:
            raise SummaryValidationError("strict: " + _first_error(exc, where)) from exc
    return summary


def summary_notes(summary: ProcessingSummary) -> list[str]:
    """Soft warnings for a reader: a newer minor version, a toggle on without its section."""
    notes = []
    major, minor = parse_version(summary.schema_version)
    known = max(parse_version(v)[1] for v in SUPPORTED_VERSIONS)
    if minor > known:
        notes.append(f"schema {summary.schema_version} is newer than this reader ({CURRENT_VERSION}); "
                     "fields it does not know are kept but not shown")
    t = summary.feature_toggles
    if t is not None and t.enable_rerank and summary.rerank_run is None:
        notes.append("rerank is enabled (feature_toggles.enable_rerank) but the summary has no rerank_run section")
    if t is not None and t.enable_sparse and summary.sparse_run is None:
        notes.append("sparse is enabled (feature_toggles.enable_sparse) but the summary has no sparse_run section")
    return notes


def read_summary_json(path: str | Path) -> Any:
    """Parse a summary file.

    Raises:
        SummaryValidationError: If the file is missing, unreadable or not JSON.
    """
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SummaryValidationError(f"{p}: no such file") from exc
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise SummaryValidationError(f"{p}: not a readable UTF-8 JSON file ({exc})") from exc
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SummaryValidationError(f"{p}: not valid JSON ({exc})") from exc


def load_summary(path: str | Path) -> ProcessingSummary:
    """Read and validate (leniently) a processing_summary.json of any v4.x writer.

    Raises:
        SummaryValidationError: If the file is missing, not JSON, or invalid.
    """
    return validate_summary(read_summary_json(path))


def write_summary(summary: ProcessingSummary, path: str | Path) -> Path:
    """Check the summary strictly, then write it atomically (temp file + rename).

    Raises:
        SummaryValidationError: If the summary breaks the contract (a bug in the writer: nothing is written).
    """
    text = summary.model_dump_json(indent=2, exclude_none=False) + "\n"
    validate_strict(json.loads(text))
    return atomic_write_text(Path(path), text)


def _ms(value: float | None) -> str:
    return "latency not recorded" if value is None else f"{value:.0f} ms"


def _gb(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.2f} GB"


def _startup_line(telemetry: Telemetry) -> str | None:
    """Where the run's time went outside its stages, and each model load: the fixed cost of a re-run."""
    parts = []
    st = telemetry.startup
    if st is not None:
        for label, value in (("process start to flow", st.process_to_flow_s), ("of it imports", st.imports_s),
                             ("Prefect server start", st.server_start_s), ("flow", st.flow_s)):
            if value is not None:
                parts.append(f"{label} {value:.1f} s")
    loads = [f"{name} {row['model_load_s']:.1f} s" for name, row in telemetry.stages.items()
             if isinstance(row, dict) and not row.get("cached") and isinstance(row.get("model_load_s"), (int, float))
             and row["model_load_s"]]
    if loads:
        parts.append("model loads: " + ", ".join(loads))
    return "Time: " + "; ".join(parts) if parts else None


def render_summary_lines(summary: ProcessingSummary) -> list[str]:
    """Human-readable lines for ``embed-collections summary``. Absent sections are not printed.

    Dense lines come first; sparse and rerank lines are appended after them.
    """
    s = summary
    lines = [
        f"Collection: {s.collection}  (schema {s.schema_version}, {s.chunk_count} chunks)",
        f"Generated: {s.generated_at}",
    ]
    if s.run_id or s.status:
        lines.append(f"Run: {s.run_id or '(no run id recorded)'}" + (f"  status={s.status}" if s.status else "")
                     + (f"  failed in {s.failed_stage}" if s.failed_stage else ""))
    if s.dense_run:
        d = s.dense_run
        lines.append(
            f"Dense: {d.model_name} on {d.device}, batch {d.batch_size}, {d.total_embeddings_generated} vectors "
            f"computed, {d.reused} reused, {_ms(d.latency_ms)}, GPU peak {_gb(d.gpu_peak_gb)} [{d.status}]"
        )
    if s.sparse_run:
        sp = s.sparse_run
        line = f"Sparse: {', '.join(sp.model_names) or '-'} [{sp.status or 'status not recorded'}]"
        if sp.computed or sp.reused:
            line += ", " + ", ".join(f"{m}: {sp.computed.get(m, 0)} computed, {sp.reused.get(m, 0)} reused"
                                     for m in sp.model_names)
        if sp.executed or (sp.executed is None and sp.vectors.total):
            line += (
                f", fallback {'yes' if sp.fallback_used else 'no'}, "
                f"coverage {sp.vectors.available}/{sp.vectors.total} ({sp.vectors.coverage_ratio:.2%})"
            )
            if sp.payload and sp.payload.latency_ms is not None:
                line += f", {_ms(sp.payload.latency_ms)}"
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
            batches = [p.batch_size for p in r.payload if p.batch_size is not None]
            latencies = [p.latency_ms for p in r.payload if p.latency_ms is not None]
            peaks = [p.gpu_peak_gb for p in r.payload if p.gpu_peak_gb is not None]
            line += (
                f" on {r.device or '?'}, batch {max(batches) if batches else '?'}, {len(r.payload)} queries, "
                f"top {r.rerank_top_k} of {r.top_k_candidates}, {_ms(sum(latencies) if latencies else None)}, "
                f"GPU peak {_gb(max(peaks) if peaks else None)}"
            )
        elif r.reason:
            line += f": {r.reason}"
        lines.append(line)
    if s.index_run:
        ir = s.index_run
        line = f"Index: {ir.backend} {ir.location} points={ir.points_count}"
        if ir.points_per_s:
            line += f", {ir.points_per_s:.0f} points/s, {ir.search_mode or '?'} search"
        lines.append(f"{line} [{ir.status or '?'}]")
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
    if (startup_line := _startup_line(s.telemetry)) is not None:
        lines.append(startup_line)
    if s.rejects.count:
        lines.append(f"Rejects: {s.rejects.count} -> {s.rejects.path}")
    for warning in s.warnings:
        lines.append(f"WARNING: {warning}")
    return lines
