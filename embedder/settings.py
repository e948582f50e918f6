"""Run configuration: the one place environment variables are read.

Values resolve in the order defaults -> config file -> environment -> explicit
overrides (the CLI or a flow parameter), and the source of every top-level value
is recorded so the run summary can say where each setting came from.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import SkipJsonSchema
from pydantic_settings import BaseSettings, SettingsConfigDict

from embedder.errors import ConfigError, UnsafeNameError
from embedder.io.atomic import file_digest

SettingSource = Literal["default", "file", "env", "cli"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_collection_name(name: str) -> str:
    """Return ``name`` if it is a safe collection name, else raise.

    A collection name becomes a directory under the output dir and a Qdrant
    collection name, so anything that could escape the output dir (``..``,
    separators, absolute paths, leading dots) is refused.

    Args:
        name: The proposed collection name.

    Returns:
        The same name.

    Raises:
        UnsafeNameError: If the name could escape the output directory.
    """
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise UnsafeNameError(
            f"collection name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..' (it becomes a directory under the output dir)"
        )
    return name


class QueryPolicy(BaseModel):
    """How query text is stored in summaries, exports and artifacts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["truncate", "hash"] = Field(
        "truncate", description="'truncate' keeps the first max_chars characters; 'hash' keeps only a sha256."
    )
    max_chars: int = Field(200, ge=1, le=10_000, description="Characters kept when mode is 'truncate'.")


class CollectionInput(BaseModel):
    """One collection to embed: a name and the file or directory it is read from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Collection name; the folder output_dir/name and the Qdrant collection are "
                      "named after it.")
    path: str = Field(description="A JSONL or Parquet file, or a directory of rag_clean *chunks*.json files.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return validate_collection_name(value)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DenseSettings(_Section):
    """The dense stage: the model (or blend of models) that embeds every chunk and query, and how it runs."""

    model: str = Field("all-minilm-l6-v2", description="Registry name, HF id or local dir.")
    backend: Literal["torch", "onnx"] = Field(
        "torch", description="torch (sentence-transformers), or ONNX Runtime on the CPU (exported once).")
    blend: dict[str, float] = Field(
        default_factory=dict, description="Further dense models blended into the dense vector, with their weight "
        "(each in (0, 1), summing below 1; the dense model keeps the rest). The stored vector joins each model's "
        "unit vector scaled by the root of its weight, so its cosine is the weighted mean of the models' cosines.")
    precision: Precision = Field(
        "auto", description="auto: bf16 on a GPU that supports it, else fp16; fp32 on the CPU. Or fp32, fp16, bf16.")

    @field_validator("blend")
    @classmethod
    def _usable_blend(cls, value: dict[str, float]) -> dict[str, float]:
        cleaned = {k.strip(): float(w) for k, w in value.items()}
        bad = {k: w for k, w in cleaned.items() if not k or not 0 < w < 1}
        if bad:
            raise ValueError(f"dense blend weights must lie strictly between 0 and 1: {bad}")
        if sum(cleaned.values()) >= 1:
            raise ValueError(f"dense blend weights sum to {sum(cleaned.values()):g}; they must sum below 1, "
                             "since the dense model keeps the rest")
        return cleaned

    @model_validator(mode="after")
    def _blend_names_other_models(self) -> DenseSettings:
        if self.model in self.blend:
            raise ValueError(f"dense blend names the dense model {self.model!r}; list only the further models")
        return self

    def components(self) -> list[tuple[str, float]]:
        """The dense vector's models with their weights: ``model`` first, then ``blend`` by name."""
        rest = sorted(self.blend.items())
        return [(self.model, round(1.0 - sum(w for _, w in rest), 6)), *rest]

    def name(self) -> str:
        """The dense vector's model as summaries, index metadata and reports name it."""
        if not self.blend:
            return self.model
        return "+".join(f"{name}*{weight:g}" for name, weight in self.components())


class SparseSettings(_Section):
    """The sparse stage: which sparse models (BM25, SPLADE) score the chunks, and how."""

    enabled: bool = Field(True, description="Compute sparse vectors (off: the index and fusion are dense-only).")
    models: list[str] = Field(default_factory=lambda: ["qdrant-bm25"], description="SPARSE_MODELS names.")
    precision: Precision = Field("auto", description="SPLADE's precision on a device (as the dense precision).")
    overlap: bool = Field(
        True, description="Run sparse inference side by side with the dense stage (bench/stages.py measures it).")

    @field_validator("models")
    @classmethod
    def _non_empty_models(cls, value: list[str]) -> list[str]:
        cleaned = [m.strip() for m in value if m.strip()]
        if not cleaned:
            raise ValueError("sparse models needs at least one model name")
        return cleaned


class FuseSettings(_Section):
    """The fuse stage: how each query's dense and sparse candidate lists become one ranking."""

    method: Literal["rrf", "dbsf"] = Field("rrf", description="How the dense and sparse lists are fused: "
                                           "reciprocal rank fusion, or distribution-based score fusion.")
    rrf_k: int = Field(60, ge=1, description="RRF's k: a larger k flattens the weight of the top ranks.")
    weights: dict[str, float] = Field(
        default_factory=dict, description="Per-list fusion weights by list name: 'dense' and each sparse model "
        "(a list not named weighs 1). `embed-collections tune` fits them on a training split.")
    retrieval_top_n: int = Field(100, ge=1, le=10_000, description="Candidates per list before fusion.")

    @field_validator("weights")
    @classmethod
    def _usable_weights(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in value.items() if not (w >= 0 and w < float("inf"))}
        if bad:
            raise ValueError(f"fusion weights must be finite and non-negative: {bad}")
        return value


class RerankSettings(_Section):
    """The rerank stage: the cross-encoder that rescores each query's fused candidates."""

    enabled: bool = Field(True, description="Rerank the fused candidates of the run's queries.")
    model: str = Field("cross-encoder/ms-marco-MiniLM-L-6-v2", description="Registry name, HF id or local dir.")
    top_k_candidates: int = Field(100, ge=1, le=10_000,
                                  description="Fused candidates per query the cross-encoder scores.")
    top_k: int = Field(20, ge=1, le=10_000, description="Reranked results kept per query.")
    latency_budget_ms: float | None = Field(None, gt=0, description="Per-query budget; cuts candidates.")
    precision: Precision = Field("auto", description="The cross-encoder's precision (as the dense precision).")


class IndexSettings(_Section):
    """The index stage: how points are written to the vector store."""

    batch_size: int = Field(
        512, ge=1, le=100_000, description="Points per upsert (bench/index.py measures the choice).")
    hnsw_min_points: int = Field(
        100_000, ge=1, description="Qdrant Edge builds an HNSW graph at or above this many points, else searches "
        "exactly (bench/index.py: exact hybrid queries stay near 15 ms at 100k points).")


class GpuSettings(_Section):
    """The GPU lease, the memory ceiling and how batches are cut (dense, SPLADE, rerank)."""

    memory_ceiling_gb: float = Field(12.0, gt=0, le=1024, description="Device memory a stage may use.")
    concurrency_limit_name: str = Field(
        "gpu", min_length=1, description="The GPU lease's global concurrency limit. '{host}' is replaced, on the "
        "host that runs the stage, by EMBEDDER_HOST or the host name: 'gpu-{host}' gives each host of a fleet "
        "its own GPU budget.")
    lease_timeout_s: float = Field(3600.0, gt=0, description="How long a stage waits for the GPU slot.")
    lease_duration_s: float = Field(300.0, ge=60, description="Lease length; a dead holder frees after it.")
    batch_policy: Literal["auto", "tokens", "items"] = Field(
        "auto", description="How GPU stages cut batches: by padded-token budget (tokens), by row count (items), "
        "or auto: tokens on a GPU, items on the CPU (bench/batching.py measures both).")
    cpu_batch_items: int = Field(
        64, ge=1, le=4096, description="Rows per batch on the CPU (dense and SPLADE; rerank takes half).")


class StreamSettings(_Section):
    """How stages stream a collection and keep its vectors between runs."""

    window: int = Field(
        4096, ge=1, le=1_000_000, description="Chunks a streaming stage holds at once: dense, sparse, index, "
        "fusion and exports read the chunk table and write vectors window by window, so memory stays flat in N.")
    vector_checkpoint_s: float = Field(
        300.0, ge=0, description="Dense and sparse vectors are published to the per-chunk store at least this "
        "often while a stage runs, so a run killed midway keeps what it embedded and its re-run embeds only the "
        "rest (0: after every window).")
    vector_retention_days: float | None = Field(
        30.0, gt=0, description="A per-chunk vector space (a model, its settings and the encoder version) that no "
        "run has used for this many days is deleted when a run set is published; spaces the retained run sets "
        "used stay whatever their age. None keeps every space.")


class OrchestrationSettings(_Section):
    """Where a run's collections execute and how runs of one collection take turns."""

    collection_fanout: Literal["auto", "subflows", "deployments"] = Field(
        "auto", description="How a run's collections execute. auto: under a deployment, a run of two or more "
        "collections makes each its own flow run of the collection deployment, placed on any worker of the "
        "pool; otherwise (one collection, the CLI) in-process subflows. deployments fans out even one.")
    collection_deployment: str = Field(
        "embed-collection/collection", min_length=3, description="The per-collection deployment fan-out submits to.")
    collection_lock_timeout_s: float = Field(
        6 * 3600.0, gt=0, description="How long a run waits while another run of the same collection (same "
        "output dir) holds it; past this the collection fails with a clear error.")


# Each section field's name in the flat form earlier releases used (and DESIGN's env examples use:
# EMBEDDER_ENABLE_RERANK). Flat names are still read from the environment, config files, flow
# parameters and the CLI; in files and parameters they earn a deprecation note in the summary.
FLAT_NAMES: dict[str, str] = {
    "dense_model": "dense.model", "dense_backend": "dense.backend", "dense_blend": "dense.blend",
    "dense_precision": "dense.precision",
    "enable_sparse": "sparse.enabled", "sparse_models": "sparse.models", "sparse_precision": "sparse.precision",
    "overlap_sparse": "sparse.overlap",
    "fusion": "fuse.method", "rrf_k": "fuse.rrf_k", "fusion_weights": "fuse.weights",
    "retrieval_top_n": "fuse.retrieval_top_n",
    "enable_rerank": "rerank.enabled", "rerank_model": "rerank.model",
    "rerank_top_k_candidates": "rerank.top_k_candidates", "rerank_top_k": "rerank.top_k",
    "rerank_latency_budget_ms": "rerank.latency_budget_ms", "rerank_precision": "rerank.precision",
    "index_batch_size": "index.batch_size", "index_hnsw_min_points": "index.hnsw_min_points",
    "gpu_memory_ceiling_gb": "gpu.memory_ceiling_gb", "gpu_concurrency_limit_name": "gpu.concurrency_limit_name",
    "gpu_lease_timeout_s": "gpu.lease_timeout_s", "gpu_lease_duration_s": "gpu.lease_duration_s",
    "batch_policy": "gpu.batch_policy", "cpu_batch_items": "gpu.cpu_batch_items",
    "stream_window": "stream.window", "vector_checkpoint_s": "stream.vector_checkpoint_s",
    "vector_retention_days": "stream.vector_retention_days",
    "collection_fanout": "orchestration.collection_fanout",
    "collection_deployment": "orchestration.collection_deployment",
    "collection_lock_timeout_s": "orchestration.collection_lock_timeout_s",
}


def _split(path: str) -> tuple[str, str | None]:
    section, _, field = path.partition(".")
    return section, field or None


def nest(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Settings keyed by path (``dense.model``), flat name (``dense_model``) or nested table, as RunConfig input.

    Returns:
        The nested dict and the flat names it met, in order.

    Raises:
        ValueError: If one setting is given twice (by two names, or by a name and its table).
    """
    out: dict[str, Any] = {}
    flat: list[str] = []
    given: dict[str, str] = {}

    def put(path: str, value: Any, name: str) -> None:
        if path in given:
            raise ValueError(f"{path} is given twice: as {given[path]!r} and as {name!r}")
        given[path] = name
        section, field = _split(path)
        if field is None:
            out[section] = value
        else:
            table = out.setdefault(section, {})
            if not isinstance(table, dict):
                raise ValueError(f"{section} must be a table of settings")
            table[field] = value

    for key, value in values.items():
        if key in FLAT_NAMES:
            flat.append(key)
            put(FLAT_NAMES[key], value, key)
        elif key in SECTIONS and isinstance(value, (dict, BaseModel)):
            table = value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) else value
            for field, inner in table.items():
                put(f"{key}.{field}", inner, f"{key}.{field}")
        else:
            put(key, value, key)
    return out, flat


class RunConfig(BaseModel):
    """Everything one run needs. This is the flow parameter, so the Prefect UI renders it as a form, one
    fieldset per section.

    Secrets never live here: Prefect stores flow parameters. Settings of earlier releases given by their
    flat names (``dense_model``, ``rrf_k``) are accepted and moved into their sections.
    """

    model_config = ConfigDict(extra="forbid")

    collections: list[CollectionInput] = Field(default_factory=list, description="Collections to embed.")
    queries_path: str | None = Field(None, description="JSONL of {_id, text}: real queries for fusion and rerank.")
    qrels_path: str | None = Field(None, description="BEIR qrels TSV (query-id, corpus-id, score) for quality metrics.")
    output_dir: str = Field("output", description="Where per-collection exports and summaries are written.")
    local_files_only: bool = Field(False, description="Never contact a model hub.")
    force_cpu: bool = Field(False, description="Never use the GPU, even where there is one.")
    max_chunk_chars: int = Field(32_768, ge=64, description="Longer chunks are truncated with a warning.")
    query_policy: QueryPolicy = Field(default_factory=QueryPolicy,
                                      description="How query text is kept in summaries, exports and artifacts.")
    dense: DenseSettings = Field(default_factory=DenseSettings, description=DenseSettings.__doc__)
    sparse: SparseSettings = Field(default_factory=SparseSettings, description=SparseSettings.__doc__)
    fuse: FuseSettings = Field(default_factory=FuseSettings, description=FuseSettings.__doc__)
    rerank: RerankSettings = Field(default_factory=RerankSettings, description=RerankSettings.__doc__)
    index: IndexSettings = Field(default_factory=IndexSettings, description=IndexSettings.__doc__)
    gpu: GpuSettings = Field(default_factory=GpuSettings, description=GpuSettings.__doc__)
    stream: StreamSettings = Field(default_factory=StreamSettings, description=StreamSettings.__doc__)
    orchestration: OrchestrationSettings = Field(default_factory=OrchestrationSettings,
                                                 description=OrchestrationSettings.__doc__)
    sources: dict[str, SettingSource] = Field(
        default_factory=dict, description="Where each setting came from, by path (filled in by resolve_run_config)."
    )
    # Not a setting: neither in the form, nor in dumps (a deployment's schema would refuse it).
    flat_names: SkipJsonSchema[list[str]] = Field(
        default_factory=list, exclude=True, description="Settings this config was given by their flat names of "
        "earlier releases (the summary's warnings name them).")

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not (FLAT_NAMES.keys() & data.keys()):
            return data
        nested, flat = nest({k: v for k, v in data.items() if k != "flat_names"})
        return {**nested, "flat_names": [*data.get("flat_names", []), *flat]}

    @model_validator(mode="after")
    def _weights_name_lists(self) -> RunConfig:
        unknown = sorted(set(self.fuse.weights) - {"dense", *self.sparse.models})
        if unknown:
            raise ValueError(f"fusion weights name {unknown}, which are not lists of this run "
                             f"(use 'dense' or one of the sparse models: {self.sparse.models})")
        return self

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy with ``update`` applied and validated (keys by path, flat name or section).

        pydantic's own ``model_copy`` skips validation, so an update by a flat name or a bad value
        would give a config that silently ignores it.
        """
        if not update:
            return super().model_copy(deep=deep)
        data, _ = nest(self.model_dump(exclude_unset=True, exclude={"flat_names"}))
        changes, _ = nest(dict(update))
        for key, value in changes.items():
            if key in SECTIONS and isinstance(value, dict):
                data[key] = {**data.get(key, {}), **value}
            else:
                data[key] = value
        return self.model_validate({**data, "flat_names": self.flat_names})

    @classmethod
    def from_recorded(cls, recorded: Mapping[str, Any]) -> RunConfig:
        """The config a summary or file recorded, flat (earlier releases) or sectioned.

        Keys this version does not know are dropped (a setting since removed), and a
        setting the record lacks takes its default, so any release's record reads.

        Raises:
            ValidationError: If a known setting holds an invalid value.
        """
        known: dict[str, Any] = {}
        for key, value in recorded.items():
            if key in SECTIONS and isinstance(value, Mapping):
                known[key] = {f: v for f, v in value.items() if f in SECTIONS[key].model_fields}
            elif (key in cls.model_fields or key in FLAT_NAMES) and key not in ("sources", "flat_names"):
                known[key] = value
        nested, _ = nest(known)
        return cls.model_validate(nested)

    def warnings(self) -> list[str]:
        """What the run's summaries say about how this config was written (flat names of earlier releases)."""
        if not self.flat_names:
            return []
        renamed = ", ".join(f"{name} -> {FLAT_NAMES[name]}" for name in self.flat_names)
        return [f"settings given by their flat names of earlier releases ({renamed}): they still work, and will "
                "be refused by the next major release; write them in their sections"]

    def setting(self, path: str) -> Any:
        """The value of the setting at ``path`` (``dense.model``, ``output_dir``)."""
        section, field = _split(path)
        value = getattr(self, section)
        return getattr(value, field) if field is not None else value

    def is_set(self, path: str) -> bool:
        """Whether the setting at ``path`` was given explicitly (not left at its default)."""
        section, field = _split(path)
        if field is None:
            return section in self.model_fields_set
        return section in self.model_fields_set and field in getattr(self, section).model_fields_set


SECTIONS: dict[str, type[BaseModel]] = {
    name: info.annotation for name, info in RunConfig.model_fields.items()
    if isinstance(info.annotation, type) and issubclass(info.annotation, _Section)
}
# Every setting by its path: the top-level ones by name, a section's as section.field.
SETTING_PATHS: tuple[str, ...] = tuple(
    path for name, info in RunConfig.model_fields.items() if name not in ("sources", "flat_names")
    for path in ([f"{name}.{f}" for f in SECTIONS[name].model_fields] if name in SECTIONS else [name])
)


def setting_field(path: str) -> FieldInfo:
    """The field that defines the setting at ``path`` (its type, default, bounds, description)."""
    section, field = _split(path)
    if field is None:
        return RunConfig.model_fields[section]
    return SECTIONS[section].model_fields[field]


def flat_name(path: str) -> str:
    """The flat name of earlier releases for ``path`` (a top-level setting keeps its own)."""
    return _PATH_TO_FLAT.get(path, path)


_PATH_TO_FLAT = {path: flat for flat, path in FLAT_NAMES.items()}


# --- what each stage's stored result depends on -------------------------------------------------

KeyedStage = Literal["load", "dense", "sparse", "fuse", "rerank"]

# The settings each stage reads to compute its stored result. A stage's cache key is a digest of
# exactly these (stage_settings), its inputs' digests and the code version: a setting is never
# listed in a key by hand, so none can be left out of one. Every setting is here or in NOT_IN_KEYS.
SETTINGS_READ: dict[KeyedStage, frozenset[str]] = {
    "load": frozenset({"max_chunk_chars"}),
    "dense": frozenset({"dense.model", "dense.backend", "dense.blend", "dense.precision", "force_cpu",
                        "local_files_only", "queries_path"}),
    "sparse": frozenset({"sparse.models", "sparse.enabled", "sparse.precision", "force_cpu", "local_files_only",
                         "queries_path"}),
    "fuse": frozenset({"fuse.method", "fuse.rrf_k", "fuse.weights", "fuse.retrieval_top_n"}),
    "rerank": frozenset({"rerank.enabled", "rerank.model", "rerank.top_k_candidates", "rerank.top_k",
                         "rerank.latency_budget_ms", "fuse.method", "query_policy", "queries_path", "force_cpu",
                         "rerank.precision", "local_files_only"}),
}

_BATCHING = ("cuts batches; vectors and scores are the same up to float rounding (padding differs), so a "
             "stored result stays valid")
_WHERE_AND_WHEN = "says where or when a stage runs, not what it computes"
_INDEX = ("is read by the index stage, which keeps no result by key: every run compares the points' digests "
          "with the published index")

# Settings that move no stage key, each with the reason.
NOT_IN_KEYS: dict[str, str] = {
    "collections": "a collection's name starts every key of its stages, and load keys the digest of its files",
    "output_dir": "every key starts with the output dir and its store's id: another output dir is another store",
    "qrels_path": "is read by the quality report, which every run computes from the stages' stored lists",
    "gpu.memory_ceiling_gb": f"caps device memory and so {_BATCHING}",
    "gpu.batch_policy": _BATCHING,
    "gpu.cpu_batch_items": _BATCHING,
    "stream.window": f"sets how many chunks a stage holds at once and so {_BATCHING}",
    "gpu.concurrency_limit_name": _WHERE_AND_WHEN,
    "gpu.lease_timeout_s": _WHERE_AND_WHEN,
    "gpu.lease_duration_s": _WHERE_AND_WHEN,
    "orchestration.collection_fanout": _WHERE_AND_WHEN,
    "orchestration.collection_deployment": _WHERE_AND_WHEN,
    "orchestration.collection_lock_timeout_s": _WHERE_AND_WHEN,
    "sparse.overlap": _WHERE_AND_WHEN,
    "stream.vector_checkpoint_s": "sets how often vectors are saved while a stage runs, not which vectors",
    "stream.vector_retention_days": "sets which unused vector spaces a publish deletes, not what a stage computes",
    "index.batch_size": _INDEX,
    "index.hnsw_min_points": _INDEX,
}

# Settings naming a file whose contents a stage reads: the key takes the file's digest, not its path.
_FILE_SETTINGS = frozenset({"queries_path"})


def stage_settings(config: RunConfig, stage: KeyedStage) -> dict[str, Any]:
    """The settings ``stage`` reads, by path, as its cache key takes them (a file by its contents' digest)."""
    dumped = config.model_dump(mode="json")
    values: dict[str, Any] = {}
    for path in sorted(SETTINGS_READ[stage]):
        section, field = _split(path)
        values[path] = dumped[section][field] if field is not None else dumped[section]
        if path in _FILE_SETTINGS and values[path]:
            values[path] = f"sha256:{file_digest(values[path])}"
    return values


class _EnvironmentBase(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBEDDER_", env_nested_delimiter="__", extra="ignore")


# Set per run or by the config file only: the collections a run embeds, and the record of sources.
_NOT_FROM_ENVIRONMENT = frozenset({"collections", "sources", "flat_names"})

# Every setting from the environment: top-level ones and sections by their own names
# (EMBEDDER_OUTPUT_DIR, EMBEDDER_DENSE__MODEL), and each section setting by its flat name too
# (EMBEDDER_DENSE_MODEL), with the same type, bounds and default.
_environment_fields: dict[str, Any] = {
    **{name: (info.annotation, copy.copy(info)) for name, info in RunConfig.model_fields.items()
       if name not in _NOT_FROM_ENVIRONMENT},
    **{flat: (setting_field(path).annotation, copy.copy(setting_field(path))) for flat, path in FLAT_NAMES.items()},
}
EmbedderSettings: type[BaseSettings] = create_model(
    "EmbedderSettings",
    __base__=_EnvironmentBase,
    __doc__="Environment settings (prefix ``EMBEDDER_``; a section's settings as ``EMBEDDER_DENSE__MODEL`` or by "
            "their flat names, ``EMBEDDER_DENSE_MODEL``): every RunConfig setting but the collections, with "
            "RunConfig's type, bounds and default, so each setting is defined once.",
    **_environment_fields,
)


def environment_settings() -> dict[str, Any]:
    """The settings the ``EMBEDDER_*`` environment sets, by path.

    Raises:
        ConfigError: If a value is invalid, or one setting is set by both its names.
    """
    try:
        env = EmbedderSettings()
    except ValidationError as exc:
        raise ConfigError(f"invalid EMBEDDER_* environment variable: {exc}") from exc
    out: dict[str, Any] = {}
    for key in env.model_fields_set:
        value = getattr(env, key)
        if key in SECTIONS:
            for field in value.model_fields_set:
                out[f"{key}.{field}"] = getattr(value, field)
        elif key in FLAT_NAMES:
            path = FLAT_NAMES[key]
            section, field = _split(path)
            if path in out or (section in env.model_fields_set
                               and field in getattr(env, section).model_fields_set):
                raise ConfigError(f"EMBEDDER_{key.upper()} and EMBEDDER_{section.upper()}__{str(field).upper()} "
                                  "both set the same setting; keep one")
            out[path] = value
        else:
            out[key] = value
    return out


class ServiceSettings(BaseSettings):
    """Connection settings that must never become flow parameters (they may hold secrets)."""

    model_config = SettingsConfigDict(extra="ignore")

    qdrant_url: str | None = Field(None, validation_alias=AliasChoices("EMBEDDER_QDRANT_URL", "QDRANT_URL"))
    qdrant_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("EMBEDDER_QDRANT_API_KEY", "QDRANT_API_KEY")
    )
    qdrant_timeout_s: float = Field(30.0, validation_alias=AliasChoices("EMBEDDER_QDRANT_TIMEOUT_S"))


class HostSettings(BaseSettings):
    """What differs between the hosts of a fleet; read in the process that runs a stage, never a parameter."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str | None = Field(None, validation_alias=AliasChoices("EMBEDDER_HOST"),
                             description="This host's name in limit templates; defaults to the host name.")


def host_name() -> str:
    """This host's name for limits and telemetry: ``EMBEDDER_HOST``, else the short host name."""
    import socket

    return HostSettings().host or socket.gethostname().split(".")[0]


_LIMIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")


def resolve_limit_name(template: str, host: str | None = None) -> str:
    """A concurrency limit name for this host: ``{host}`` in ``template`` replaced by the host's name.

    The name is resolved where the stage runs (a fleet's workers), not where the
    run was started: ``gpu-{host}`` gives each GPU host its own budget while every
    run carries the same settings.

    Args:
        template: ``gpu``, ``gpu-{host}``, ...
        host: The host name; default ``EMBEDDER_HOST``, else ``socket.gethostname()``.

    Raises:
        ConfigError: If the result is not a usable limit name.
    """
    if "{host}" in template:
        template = template.replace("{host}", host or host_name())
    if not _LIMIT_NAME.fullmatch(template) or "{" in template:
        raise ConfigError(f"concurrency limit name {template!r} is not usable: letters, digits, '.', '_', ':' "
                          "and '-' only, and '{host}' is the one placeholder")
    return template


# `--config recommended`: the fusion the project ships for this kind of data, fitted by
# `embed-collections eval --tune` on SciFact's train split (its [tuning] table says so).
RECOMMENDED_CONFIG = Path(__file__).resolve().parent / "data" / "recommended_fusion.toml"


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON config file into a dict of RunConfig settings.

    A TOML file may put the settings at the top level or under ``[embedder]``
    (other tables, such as a tuned file's ``[tuning]``, are provenance and
    ignored); a section's settings sit in its table (``[embedder.fuse]``), or
    under their flat names of earlier releases (``rrf_k``). ``recommended``
    names the packaged recommended fusion.

    Args:
        path: The config file.

    Returns:
        The settings it sets, as written (tables nested, flat names as they are).

    Raises:
        ConfigError: If the file is missing, unparsable, not a table or names an unknown setting.
    """
    p = RECOMMENDED_CONFIG if str(path) == "recommended" else Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        if p.suffix == ".toml":
            data: Any = tomllib.loads(p.read_text(encoding="utf-8"))
            data = data.get("embedder", data)
        elif p.suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
        else:
            raise ConfigError(f"config file {str(p)!r}: use a .toml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a table of settings")
    unknown = sorted(set(data) - set(RunConfig.model_fields) - set(FLAT_NAMES) - {"sources", "flat_names"})
    for section, cls in SECTIONS.items():
        if isinstance(data.get(section), dict):
            unknown += [f"{section}.{k}" for k in data[section] if k not in cls.model_fields]
    if unknown:
        raise ConfigError(f"config file {str(p)!r} has unknown settings: {', '.join(unknown)}")
    return data


def by_path(values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Settings given by path, flat name or section table, as one dict by path (``dense.model``).

    Returns:
        The settings by path and the flat names met.

    Raises:
        ValueError: If one setting is given twice.
    """
    nested, flat = nest(dict(values))
    out: dict[str, Any] = {}
    for key, value in nested.items():
        if key in SECTIONS and isinstance(value, dict):
            out.update({f"{key}.{field}": inner for field, inner in value.items()})
        else:
            out[key] = value
    return out, flat


def resolve_run_config(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    read_env: bool = True,
) -> RunConfig:
    """Resolve a :class:`RunConfig` from defaults, a file, the environment and overrides.

    Args:
        config_file: Optional TOML/JSON file.
        overrides: Explicit values (from the CLI or a flow parameter), by path, flat name or section table;
            ``None`` values are ignored.
        read_env: Read ``EMBEDDER_*`` variables (tests may turn this off).

    Returns:
        The validated config, with ``sources`` naming each setting's origin by path, and ``flat_names`` the
        settings a file or the overrides gave by their flat names of earlier releases.

    Raises:
        ConfigError: If any layer holds an invalid value.
    """
    merged: dict[str, Any] = {}
    sources: dict[str, SettingSource] = dict.fromkeys(SETTING_PATHS, "default")
    flat_names: list[str] = []
    try:
        if config_file is not None:
            from_file, flat = by_path(load_config_file(config_file))
            merged.update(from_file)
            sources.update(dict.fromkeys(from_file, "file"))
            flat_names += flat
        if read_env:
            from_env = environment_settings()
            merged.update(from_env)
            sources.update(dict.fromkeys(from_env, "env"))
        given, flat = by_path({k: v for k, v in (overrides or {}).items() if v is not None})
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"invalid run configuration: {exc}") from exc
    given = {k: v for k, v in given.items() if v is not None}
    merged.update(given)
    sources.update(dict.fromkeys(given, "cli"))
    flat_names += flat
    merged.pop("sources", None)
    try:
        nested, _ = nest(merged)
        return RunConfig(**nested, sources=sources, flat_names=list(dict.fromkeys(flat_names)))
    except (ValidationError, ValueError) as exc:
        raise ConfigError(f"invalid run configuration: {exc}") from exc
