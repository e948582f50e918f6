"""Exports and the v4.1 roll-up: turning stage results into files and a true summary."""

from __future__ import annotations

import errno
import filecmp
import os
import platform
import shutil
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from embedder.errors import StageError
from embedder.gpu import process_peak_rss_gb
from embedder.io.load import LoadResult
from embedder.io.readers import read_qrels
from embedder.io.runset import current_run
from embedder.io.writers import iter_jsonl_records, read_jsonl_records, write_jsonl
from embedder.quality import evaluate
from embedder.settings import SETTING_PATHS, RunConfig
from embedder.stages import (
    DenseStageResult,
    FusionResult,
    IndexResult,
    RerankStageResult,
    SparseStageResult,
    SummarySection,
    collection_dir,
    dense_section,
    fusion_section,
    index_section,
    iter_collection_points,
    load_section,
    rerank_section,
    sparse_section,
)
from embedder.startup import startup_telemetry
from embedder.summary import (
    FeatureToggles,
    GpuBaseline,
    Integrity,
    LeaseEvent,
    PerformanceBaseline,
    ProcessingSummary,
    RejectsInfo,
    SystemBaseline,
    Telemetry,
    write_summary,
)
from embedder.tuning import list_label, query_lists

_VERSIONED = ("torch", "sentence-transformers", "transformers", "fastembed", "qdrant-client", "prefect", "pyarrow")


def library_versions() -> dict[str, str]:
    """Versions of python and the libraries that shape the outputs."""
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _link_atomic(src: str, dst: Path) -> None:
    """Publish a stage file into a run set: a hard link (stage files are never rewritten), else a copy.

    A link costs nothing at any size, and the set keeps its file when the stage
    store is pruned. It is made under a temporary name and renamed over ``dst``,
    so a reader sees the old file or the new one.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex}.tmp"
    try:
        try:
            os.link(src, tmp)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise  # a full disk or a missing source: copying would fail the same way, or hide it
            shutil.copyfile(src, tmp)  # another file system, or links not supported
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def write_exports(
    config: RunConfig,
    collection: str,
    load: LoadResult,
    dense: DenseStageResult | None,
    sparse: SparseStageResult | None,
    rerank: RerankStageResult | None,
    run_path: str | Path,
) -> dict[str, str]:
    """Write the collection's exports into its run set; return name -> path of each file written.

    ``dense.parquet``, ``sparse.jsonl`` and ``qdrant.jsonl`` need the dense stage;
    ``rerank.jsonl`` needs an executed rerank; ``chunks.parquet`` (the validated
    chunk table) and ``rejects.jsonl`` are always written.
    """
    cdir = Path(run_path)
    out: dict[str, str] = {}
    _link_atomic(load.rejects.path, cdir / "rejects.jsonl")
    out["rejects"] = str(cdir / "rejects.jsonl")
    # The validated chunk table (full texts), for the search service's rerank pass.
    _link_atomic(load.chunks.path, cdir / "chunks.parquet")
    out["chunks"] = str(cdir / "chunks.parquet")
    if dense is not None:
        _link_atomic(dense.vectors.path, cdir / "dense.parquet")
        out["dense"] = str(cdir / "dense.parquet")
    if sparse is not None and sparse.outputs:
        rows = (rec for o in sparse.outputs for rec in iter_jsonl_records(o.vectors.path))
        write_jsonl(cdir / "sparse.jsonl", ({k: r[k] for k in ("id", "sparse_vector", "model", "fallback")}
                                            for r in rows))
        out["sparse"] = str(cdir / "sparse.jsonl")
    if dense is not None and sparse is not None:
        batches = iter_collection_points(config, collection, load.chunks, dense, sparse)
        write_jsonl(cdir / "qdrant.jsonl", (p for batch in batches for p in batch))
        out["qdrant"] = str(cdir / "qdrant.jsonl")
    if rerank is not None and rerank.status == "executed" and rerank.results is not None:
        _link_atomic(rerank.results.path, cdir / "rerank.jsonl")
        out["rerank"] = str(cdir / "rerank.jsonl")
    _share_unchanged(cdir, current_run(config.output_dir, collection), ("sparse.jsonl", "qdrant.jsonl"))
    return out


def _share_unchanged(run_dir: Path, published: Path | None, names: tuple[str, ...]) -> None:
    """Make each export that equals the published set's a hard link to it: an unchanged night costs no disk.

    The exports written (not linked from the stage store) are most of a run
    set's bytes; kept run sets would otherwise hold one copy each of the same
    file. Files are never rewritten in place, so sharing one is safe.
    """
    if published is None or published.resolve() == run_dir.resolve():
        return
    for name in names:
        new, old = run_dir / name, published / name
        try:
            # Byte for byte (sizes first, stopping at the first difference), so a published file that was
            # damaged since is never linked in its place.
            same = not os.path.samefile(new, old) and filecmp.cmp(new, old, shallow=False)
        except OSError:  # not written this run, or not in the published set
            continue
        if same:
            _link_atomic(str(old), new)


def compute_quality(config: RunConfig, fusion: FusionResult | None,
                    rerank: RerankStageResult | None) -> dict[str, dict[str, float]] | None:
    """nDCG@10 and Recall@100 for every list the run produced, when qrels were given."""
    if not config.qrels_path or fusion is None or fusion.candidates is None:
        return None
    qrels = read_qrels(config.qrels_path)
    # Lists named as `eval` names them (dense, sparse:<model>), so the two reports share their keys.
    runs: dict[str, dict[str, list[str]]] = {"dense": {}, "fused_rrf": {}, "fused_dbsf": {}}
    for q in query_lists(iter_jsonl_records(fusion.candidates.path)):
        for name, lst in q.lists.items():
            runs.setdefault(list_label(name), {})[q.query_id] = [c.id for c in lst]
        for method, fused_list in q.fused.items():
            runs[f"fused_{method}"][q.query_id] = [c.id for c in fused_list]
    if rerank is not None and rerank.status == "executed" and rerank.results is not None:
        # Reranked top-k first, then the rest of the fused list, so Recall@100 compares like with like.
        fused = runs["fused_rrf" if config.fuse.method == "rrf" else "fused_dbsf"]
        reranked = {}
        for rec in read_jsonl_records(rerank.results.path):
            head = [c["id"] for c in rec["results"]]
            reranked[rec["query_id"]] = head + [d for d in fused.get(rec["query_id"], []) if d not in set(head)]
        runs["reranked"] = reranked
    return {name: evaluate(run, qrels) for name, run in runs.items()}


@dataclass
class CollectionOutcome:
    """What the flow gathered for one collection: each stage's result (None when it produced none).

    Attributes:
        errors: Stage name -> error message for stages that failed outright.
        cached: Stages whose result came from the cache.
        cancelled: Why the run stopped before it finished (``"SIGTERM"``), when it was asked to stop.
    """

    collection: str
    run_id: uuid.UUID
    latency_seconds: float = 0.0
    load: LoadResult | None = None
    dense: DenseStageResult | None = None
    sparse: SparseStageResult | None = None
    index: IndexResult | None = None
    fusion: FusionResult | None = None
    rerank: RerankStageResult | None = None
    exports: dict[str, str] = field(default_factory=dict)
    exports_run_id: str | None = None
    carried: bool = False
    errors: dict[str, str] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)
    cancelled: str | None = None
    healed: list[dict[str, str]] = field(default_factory=list)

    def lease_events(self) -> list[LeaseEvent]:
        """Lease events of the GPU stages that ran in this run (a cached stage took no lease)."""
        return [r.lease_event for stage, r in (("dense", self.dense), ("sparse", self.sparse), ("rerank", self.rerank))
                if r is not None and r.lease_event is not None and stage not in self.cached]


def _export_section(outcome: CollectionOutcome) -> SummarySection:
    # Without its exports a collection has nothing to publish: the run failed.
    o = outcome
    section = SummarySection(fields={"exports": o.exports,
                                     "rejects": RejectsInfo(count=o.load.reject_count if o.load else 0,
                                                            path=o.exports.get("rejects"))},
                             failed="export" in o.errors)
    if o.carried:
        section.fields["exports_run_id"] = o.exports_run_id
        section.warnings.append(
            f"this run failed: the exports and index beside this summary are those of run {o.exports_run_id}, "
            "the last one published, and the index still serves them" if o.exports_run_id else
            "this run failed and no earlier run was published: there are no exports or index for this collection")
    return section


def _integrity_section(outcome: CollectionOutcome) -> SummarySection:
    # A stage served from cache read no vector store this run: it has nothing to report.
    ran = [(stage, r.integrity) for stage, r in (("dense", outcome.dense), ("sparse", outcome.sparse))
           if r is not None and stage not in outcome.cached and r.integrity is not None]
    quarantined = [{"stage": stage, **q} for stage, found in ran for q in found.quarantined]
    warnings = [f"{q['stage']}: a damaged vector-store part ({q['reason']}) was set aside in {q['file']}; "
                "its vectors were embedded again" for q in quarantined]
    for q in outcome.healed:
        quarantined.append({k: q[k] for k in ("stage", "file", "reason")})
        if q.get("kind") == "vector part":
            warnings.append(f"{q['stage']}: a damaged vector-store part under its stored result ({q['reason']}) "
                            f"was set aside in {q['file']}; the stage ran again and embedded its vectors again")
        else:
            warnings.append(f"{q['stage']}: its stored result was damaged ({q['reason']}); it was set aside in "
                            f"{q['file']} and the stage ran again")
    checked = sum(found.checked for _stage, found in ran)
    rebuilt = []
    damaged = len(quarantined)
    if outcome.index is not None:
        index = outcome.index.integrity
        checked += index.checked
        damaged += len(index.damaged)
        if index.rebuilt:
            # The index section's own warning says it; here is the record.
            rebuilt.append({"what": "index", "reason": index.rebuilt, "build": str(outcome.index.build_id)})
    integrity = Integrity(files_checked=checked, damaged=damaged, quarantined=quarantined, rebuilt=rebuilt)
    return SummarySection(fields={"integrity": integrity}, warnings=warnings)


def _failed_stage(outcome: CollectionOutcome) -> str | None:
    order = ("preflight", "load", "dense", "index", "export")
    return next((stage for stage in order if stage in outcome.errors), None)


def build_summary(config: RunConfig, outcome: CollectionOutcome,
                  quality: dict[str, dict[str, float]] | None = None) -> ProcessingSummary:
    """Compose the v4.1 summary from each stage's section; its warnings say what went wrong.

    The run is ``cancelled`` when it was stopped on request before it finished,
    ``failed`` when a section says the collection has no usable result (no dense
    vectors, no index, no exports), ``partial`` when a stage failed or fell
    short, else ``completed``.
    """
    o = outcome
    chunk_count = o.load.chunk_count if o.load else 0
    sections = [
        load_section(o.load),
        SummarySection(warnings=[f"{stage} stage failed: {err}" for stage, err in o.errors.items()],
                       failed=any(stage in o.errors for stage in ("preflight", "load")),
                       fields={"failed_stage": _failed_stage(o)}),
        dense_section(config, o.dense, o.errors.get("dense"), "dense" in o.cached),
        sparse_section(config, o.sparse, o.errors.get("sparse"), "sparse" in o.cached),
        fusion_section(config, o.fusion, o.errors.get("fuse"), "fuse" in o.cached),
        rerank_section(config, o.rerank, o.errors.get("rerank"), "rerank" in o.cached),
        index_section(o.index, o.errors.get("index"), chunk_count),
        _export_section(o),
        _integrity_section(o),
    ]
    fields: dict[str, Any] = {}
    stages: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for section in sections:
        fields.update(section.fields)
        stages.update(section.stages)
        warnings.extend(section.warnings)
    warnings.extend(o.warnings)
    if o.cancelled:
        stage = next(iter(o.errors), None)
        warnings.insert(0, f"run stopped by {o.cancelled}" + (f" during {stage}" if stage else "")
                        + ": the stages after it did not run; the dense vectors it finished are stored, "
                        "and the re-run embeds only the rest")
    failed = any(s.failed for s in sections)
    if o.cancelled and fields.get("failed_stage") is None:
        fields["failed_stage"] = next(iter(o.errors), None)  # the stage the stop interrupted
    if failed and fields.get("failed_stage") is None:
        fields["failed_stage"] = "dense"  # the only stage without which nothing ran, and no error of its own
    degraded = bool(o.errors) or any(s.degraded for s in sections)
    gpu_peak = max([s.get("gpu_peak_gb", 0.0) for s in stages.values()] + [0.0])
    # A config built without resolve_run_config (a UI form, a test) has no recorded sources:
    # explicitly given values count as overrides, the rest as defaults.
    toggles_sources = {path: config.sources.get(path, "cli" if config.is_set(path) else "default")
                       for path in SETTING_PATHS}
    warnings.extend(config.warnings())
    return ProcessingSummary(
        collection=o.collection,
        run_id=o.run_id,
        status="cancelled" if o.cancelled else "failed" if failed else ("partial" if degraded else "completed"),
        feature_toggles=FeatureToggles(enable_rerank=config.rerank.enabled, enable_sparse=config.sparse.enabled,
                                       sparse_models=config.sparse.models,
                                       sources={k: str(v) for k, v in toggles_sources.items()}),
        telemetry=Telemetry(lease_events=o.lease_events(), stages=stages, startup=startup_telemetry()),
        performance_baseline=PerformanceBaseline(
            latency_seconds=o.latency_seconds,
            gpu=GpuBaseline(soft_limit_gb=config.gpu.memory_ceiling_gb, peak_memory_used_gb=gpu_peak,
                            soft_limit_exceeded=gpu_peak > config.gpu.memory_ceiling_gb),
            system=SystemBaseline(peak_memory_gb=process_peak_rss_gb()),
        ),
        quality=quality,
        versions=library_versions(),
        model_fingerprints=_fingerprints(config),
        config=config.model_dump(mode="json", exclude={"sources"}),
        warnings=list(dict.fromkeys(warnings)),
        **fields,
    )


def _fingerprints(config: RunConfig) -> dict[str, str]:
    from embedder.stages import model_fingerprint

    roles: list[tuple[str, Any]] = [(name, "dense") for name, _weight in config.dense.components()]
    roles += [(m, "sparse") for m in config.sparse.models] if config.sparse.enabled else []
    roles += [(config.rerank.model, "rerank")] if config.rerank.enabled else []
    return {name: model_fingerprint(name, role, config.local_files_only) for name, role in roles}


def write_collection_summary(summary: ProcessingSummary, run_path: str | Path) -> Path:
    """Write the summary into its run set, beside the exports it describes."""
    return write_summary(summary, Path(run_path) / "processing_summary.json")


def new_run_set(config: RunConfig, collection: str, run_id: uuid.UUID) -> str:
    """A fresh run-set directory for one collection, owned by this run until :func:`close_run_set`.

    One per attempt: a retry never writes into a published set.
    """
    from datetime import UTC, datetime

    from embedder.io.runset import open_run

    name = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{str(run_id)[:8]}-{uuid.uuid4().hex[:6]}"
    return str(open_run(config.output_dir, collection, name))


_EXPORT_KEYS = {"chunks.parquet": "chunks", "dense.parquet": "dense", "sparse.jsonl": "sparse",
                "qdrant.jsonl": "qdrant", "rerank.jsonl": "rerank"}


def carry_forward(config: RunConfig, collection: str, run_path: str | Path,
                  load: LoadResult | None) -> tuple[dict[str, str], str | None]:
    """Fill a failed run's set with the last published set's exports and index manifest.

    A failed run still publishes its summary (every run that starts leaves one),
    but nothing it half-produced: beside that summary stay the exports and the
    index of the last run that was published, and the summary says whose they
    are. This run's own ``rejects.jsonl`` is kept: its summary counts them.

    Returns:
        The exports (name -> path in this set) and the run id they come from (None when there was none).
    """
    import json

    from embedder.io.runset import EXPORTS_SUMMARY, SET_FILES, current_run

    run = Path(run_path)
    for name in SET_FILES:
        if name != "processing_summary.json":
            (run / name).unlink(missing_ok=True)
    exports: dict[str, str] = {}
    if load is not None and Path(load.rejects.path).is_file():
        _link_atomic(load.rejects.path, run / "rejects.jsonl")
        exports["rejects"] = str(run / "rejects.jsonl")
    previous = current_run(config.output_dir, collection)
    if previous is None:
        return exports, None
    for name in SET_FILES:
        if name in ("processing_summary.json", "rejects.jsonl", EXPORTS_SUMMARY) or not (previous / name).is_file():
            continue
        _link_atomic(str(previous / name), run / name)
        if name in _EXPORT_KEYS:
            exports[_EXPORT_KEYS[name]] = str(run / name)
    missing = [name for name in SET_FILES if name not in ("processing_summary.json", "rejects.jsonl", EXPORTS_SUMMARY)
               and (previous / name).is_file() and not (run / name).is_file()]
    if missing:
        raise StageError(f"the last good run set's {', '.join(missing)} could not be carried into {run}")
    # The summary that describes the carried exports (models, settings) travels with them, through
    # any number of failed runs in a row: search embeds queries with the models that built the index.
    served = previous / EXPORTS_SUMMARY
    served = served if served.is_file() else previous / "processing_summary.json"
    try:
        prev = json.loads(served.read_text(encoding="utf-8"))
        source = prev.get("run_id")
        _link_atomic(str(served), run / EXPORTS_SUMMARY)
    except (OSError, ValueError):
        source = None
    return exports, str(source) if source else None


def close_run_set(run_path: str | Path) -> None:
    """The run has finished with its set, published or not (pruning may take it from now on)."""
    from embedder.io.runset import close_run

    close_run(run_path)


def publish_run_set(config: RunConfig, collection: str, run_path: str | Path) -> Path:
    """Publish a run set (exports, summary, index manifest) with one switch; return the summary's stable path.

    Afterwards, what nothing refers to any more is removed: replaced run sets,
    unreferenced Edge shards, and stage results no retained run used.
    """
    from embedder.io.edge_store import EdgeStore
    from embedder.io.integrity import write_checksums
    from embedder.io.runset import publish_run, retention_cutoff
    from embedder.stages import collect_stage_dirs, collect_vector_spaces

    # Sealed like a stage directory: `verify` checks a published set's exports against what was published.
    write_checksums(run_path)
    publish_run(config.output_dir, collection, Path(run_path))
    EdgeStore(config.output_dir).collect_garbage(collection)
    cutoff = retention_cutoff(config.output_dir, collection)
    collect_stage_dirs(config, collection, cutoff)
    if config.stream.vector_retention_days is not None:
        # A space the retained run sets used stays, however old: their re-runs must stay cheap.
        retained_s = config.stream.vector_retention_days * 86400
        collect_vector_spaces(config, collection, min(cutoff, time.time() - retained_s))
    return collection_dir(config, collection) / "processing_summary.json"


def find_run_summary(output_dir: str | Path, collection: str, run_id: uuid.UUID | str) -> Path | None:
    """The summary a given run wrote for a collection (its run set's, published or not), or None.

    A run set's name carries the run id's first 8 characters; the summary's own
    ``run_id`` decides. With several attempts (a retried flow run), the newest wins.
    """
    from embedder.io.runset import RUNS
    from embedder.summary import read_summary_json

    runs = Path(output_dir) / collection / RUNS
    found: list[Path] = []
    for path in runs.glob(f"*-{str(run_id)[:8]}-*/processing_summary.json") if runs.is_dir() else []:
        try:
            data = read_summary_json(path)
        except Exception:  # a half-written or foreign file is not this run's summary
            continue
        if isinstance(data, dict) and str(data.get("run_id")) == str(run_id):
            found.append(path)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
