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
from pathlib import Path
from typing import Any, Literal

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


class RunConfig(BaseModel):
    """Everything one run needs. This is the flow parameter, so the Prefect UI renders it as a form.

    Secrets never live here: Prefect stores flow parameters.
    """

    model_config = ConfigDict(extra="forbid")

    collections: list[CollectionInput] = Field(default_factory=list, description="Collections to embed.")
    queries_path: str | None = Field(None, description="JSONL of {_id, text}: real queries for fusion and rerank.")
    qrels_path: str | None = Field(None, description="BEIR qrels TSV (query-id, corpus-id, score) for quality metrics.")
    output_dir: str = Field("output", description="Where per-collection exports and summaries are written.")
    dense_model: str = Field("all-minilm-l6-v2", description="Registry name, HF id or local dir.")
    dense_backend: Literal["torch", "onnx"] = Field(
        "torch", description="torch (sentence-transformers), or ONNX Runtime on the CPU (exported once)."
    )
    dense_blend: dict[str, float] = Field(
        default_factory=dict, description="Further dense models blended into the dense vector, with their weight "
        "(each in (0, 1), summing below 1; dense_model keeps the rest). The stored vector joins each model's unit "
        "vector scaled by the root of its weight, so its cosine is the weighted mean of the models' cosines.")
    sparse_models: list[str] = Field(default_factory=lambda: ["qdrant-bm25"], description="SPARSE_MODELS names.")
    rerank_model: str = Field("cross-encoder/ms-marco-MiniLM-L-6-v2", description="Registry name, HF id or local dir.")
    enable_sparse: bool = Field(True, description="Compute sparse vectors (off: the index and fusion are dense-only).")
    enable_rerank: bool = Field(True, description="Rerank the fused candidates of the run's queries.")
    rerank_top_k_candidates: int = Field(100, ge=1, le=10_000,
                                         description="Fused candidates per query the cross-encoder scores.")
    rerank_top_k: int = Field(20, ge=1, le=10_000, description="Reranked results kept per query.")
    rerank_latency_budget_ms: float | None = Field(None, gt=0, description="Per-query budget; cuts candidates.")
    fusion: Literal["rrf", "dbsf"] = Field("rrf", description="How the dense and sparse lists are fused: "
                                           "reciprocal rank fusion, or distribution-based score fusion.")
    rrf_k: int = Field(60, ge=1, description="RRF's k: a larger k flattens the weight of the top ranks.")
    fusion_weights: dict[str, float] = Field(
        default_factory=dict, description="Per-list fusion weights by list name: 'dense' and each sparse model "
        "(a list not named weighs 1). `embed-collections tune` fits them on a training split.")
    retrieval_top_n: int = Field(100, ge=1, le=10_000, description="Candidates per list before fusion.")
    gpu_memory_ceiling_gb: float = Field(12.0, gt=0, le=1024)
    gpu_concurrency_limit_name: str = Field(
        "gpu", min_length=1, description="The GPU lease's global concurrency limit. '{host}' is replaced, on the "
        "host that runs the stage, by EMBEDDER_HOST or the host name: 'gpu-{host}' gives each host of a fleet "
        "its own GPU budget.")
    gpu_lease_timeout_s: float = Field(3600.0, gt=0, description="How long a stage waits for the GPU slot.")
    gpu_lease_duration_s: float = Field(300.0, ge=60, description="Lease length; a dead holder frees after it.")
    query_policy: QueryPolicy = Field(default_factory=QueryPolicy)
    local_files_only: bool = Field(False, description="Never contact a model hub.")
    force_cpu: bool = Field(False, description="Never use the GPU, even where there is one.")
    max_chunk_chars: int = Field(32_768, ge=64, description="Longer chunks are truncated with a warning.")
    index_batch_size: int = Field(
        512, ge=1, le=100_000, description="Points per upsert (bench/index.py measures the choice)."
    )
    index_hnsw_min_points: int = Field(
        100_000, ge=1, description="Qdrant Edge builds an HNSW graph at or above this many points, else searches "
        "exactly (bench/index.py: exact hybrid queries stay near 15 ms at 100k points).",
    )
    collection_fanout: Literal["auto", "subflows", "deployments"] = Field(
        "auto", description="How a run's collections execute. auto: under a deployment, each collection is its "
        "own flow run of `collection_deployment`, placed on any worker of the pool; otherwise in-process subflows.")
    collection_deployment: str = Field(
        "embed-collection/collection", min_length=3, description="The per-collection deployment fan-out submits to.")
    collection_lock_timeout_s: float = Field(
        6 * 3600.0, gt=0, description="How long a run waits while another run of the same collection (same "
        "output dir) holds it; past this the collection fails with a clear error.")
    overlap_sparse: bool = Field(
        True, description="Run sparse inference side by side with the dense stage (bench/stages.py measures it).")
    stream_window: int = Field(
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
    dense_precision: Precision = Field(
        "auto", description="auto: bf16 on a GPU that supports it, else fp16; fp32 on the CPU. Or fp32, fp16, bf16.")
    sparse_precision: Precision = Field("auto", description="SPLADE's precision on a device (as dense_precision).")
    rerank_precision: Precision = Field("auto", description="The cross-encoder's precision (as dense_precision).")
    batch_policy: Literal["auto", "tokens", "items"] = Field(
        "auto", description="How GPU stages cut batches: by padded-token budget (tokens), by row count (items), "
        "or auto: tokens on a GPU, items on the CPU (bench/batching.py measures both).")
    cpu_batch_items: int = Field(
        64, ge=1, le=4096, description="Rows per batch on the CPU (dense and SPLADE; rerank takes half).")
    sources: dict[str, SettingSource] = Field(
        default_factory=dict, description="Where each setting came from (filled in by resolve_run_config)."
    )

    def dense_components(self) -> list[tuple[str, float]]:
        """The dense vector's models with their weights: ``dense_model`` first, then ``dense_blend`` by name."""
        rest = sorted(self.dense_blend.items())
        return [(self.dense_model, round(1.0 - sum(w for _, w in rest), 6)), *rest]

    def dense_name(self) -> str:
        """The dense vector's model as summaries, index metadata and reports name it."""
        if not self.dense_blend:
            return self.dense_model
        return "+".join(f"{name}*{weight:g}" for name, weight in self.dense_components())

    @field_validator("sparse_models")
    @classmethod
    def _non_empty_models(cls, value: list[str]) -> list[str]:
        cleaned = [m.strip() for m in value if m.strip()]
        if not cleaned:
            raise ValueError("sparse_models needs at least one model name")
        return cleaned

    @field_validator("fusion_weights")
    @classmethod
    def _usable_weights(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in value.items() if not (w >= 0 and w < float("inf"))}
        if bad:
            raise ValueError(f"fusion weights must be finite and non-negative: {bad}")
        return value

    @field_validator("dense_blend")
    @classmethod
    def _usable_blend(cls, value: dict[str, float]) -> dict[str, float]:
        cleaned = {k.strip(): float(w) for k, w in value.items()}
        bad = {k: w for k, w in cleaned.items() if not k or not 0 < w < 1}
        if bad:
            raise ValueError(f"dense_blend weights must lie strictly between 0 and 1: {bad}")
        if sum(cleaned.values()) >= 1:
            raise ValueError(f"dense_blend weights sum to {sum(cleaned.values()):g}; they must sum below 1, "
                             "since dense_model keeps the rest")
        return cleaned

    @model_validator(mode="after")
    def _blend_names_other_models(self) -> RunConfig:
        if self.dense_model in self.dense_blend:
            raise ValueError(f"dense_blend names dense_model {self.dense_model!r}; list only the further models")
        return self

    @model_validator(mode="after")
    def _weights_name_lists(self) -> RunConfig:
        unknown = sorted(set(self.fusion_weights) - {"dense", *self.sparse_models})
        if unknown:
            raise ValueError(f"fusion_weights names {unknown}, which are not lists of this run "
                             f"(use 'dense' or one of sparse_models: {self.sparse_models})")
        return self


# --- what each stage's stored result depends on -------------------------------------------------

KeyedStage = Literal["load", "dense", "sparse", "fuse", "rerank"]

# The settings each stage reads to compute its stored result. A stage's cache key is a digest of
# exactly these (stage_settings), its inputs' digests and the code version: a setting is never
# listed in a key by hand, so none can be left out of one. Every field is here or in NOT_IN_KEYS.
SETTINGS_READ: dict[KeyedStage, frozenset[str]] = {
    "load": frozenset({"max_chunk_chars"}),
    "dense": frozenset({"dense_model", "dense_backend", "dense_blend", "dense_precision", "force_cpu",
                        "local_files_only", "queries_path"}),
    "sparse": frozenset({"sparse_models", "enable_sparse", "sparse_precision", "force_cpu", "local_files_only",
                         "queries_path"}),
    "fuse": frozenset({"fusion", "rrf_k", "fusion_weights", "retrieval_top_n"}),
    "rerank": frozenset({"enable_rerank", "rerank_model", "rerank_top_k_candidates", "rerank_top_k",
                         "rerank_latency_budget_ms", "fusion", "query_policy", "queries_path", "force_cpu",
                         "rerank_precision", "local_files_only"}),
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
    "sources": "records where each value came from, not a value",
    "qrels_path": "is read by the quality report, which every run computes from the stages' stored lists",
    "gpu_memory_ceiling_gb": f"caps device memory and so {_BATCHING}",
    "batch_policy": _BATCHING,
    "cpu_batch_items": _BATCHING,
    "stream_window": f"sets how many chunks a stage holds at once and so {_BATCHING}",
    "gpu_concurrency_limit_name": _WHERE_AND_WHEN,
    "gpu_lease_timeout_s": _WHERE_AND_WHEN,
    "gpu_lease_duration_s": _WHERE_AND_WHEN,
    "collection_fanout": _WHERE_AND_WHEN,
    "collection_deployment": _WHERE_AND_WHEN,
    "collection_lock_timeout_s": _WHERE_AND_WHEN,
    "overlap_sparse": _WHERE_AND_WHEN,
    "vector_checkpoint_s": "sets how often vectors are saved while a stage runs, not which vectors",
    "vector_retention_days": "sets which unused vector spaces a publish deletes, not what a stage computes",
    "index_batch_size": _INDEX,
    "index_hnsw_min_points": _INDEX,
}

# Settings naming a file whose contents a stage reads: the key takes the file's digest, not its path.
_FILE_SETTINGS = frozenset({"queries_path"})


def stage_settings(config: RunConfig, stage: KeyedStage) -> dict[str, Any]:
    """The settings ``stage`` reads, as its cache key takes them (a file setting by its contents' digest)."""
    values = config.model_dump(mode="json", include=set(SETTINGS_READ[stage]))
    for name in _FILE_SETTINGS & values.keys():
        if values[name]:
            values[name] = f"sha256:{file_digest(values[name])}"
    return values


class _EnvironmentBase(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBEDDER_", env_nested_delimiter="__", extra="ignore")


# Set per run or by the config file only: the collections a run embeds, and the record of sources.
_NOT_FROM_ENVIRONMENT = frozenset({"collections", "sources"})

_environment_fields: dict[str, Any] = {name: (info.annotation, copy.copy(info))
                                       for name, info in RunConfig.model_fields.items()
                                       if name not in _NOT_FROM_ENVIRONMENT}
EmbedderSettings: type[BaseSettings] = create_model(
    "EmbedderSettings",
    __base__=_EnvironmentBase,
    __doc__="Environment settings (prefix ``EMBEDDER_``; nested values use ``__``): every RunConfig field but "
            "the collections, with RunConfig's type, bounds and default, so each setting is defined once.",
    **_environment_fields,
)


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
    """Read a TOML or JSON config file into a dict of RunConfig fields.

    A TOML file may put the fields at the top level or under ``[embedder]``
    (other tables, such as a tuned file's ``[tuning]``, are provenance and
    ignored). ``recommended`` names the packaged recommended fusion.

    Args:
        path: The config file.

    Returns:
        The fields it sets.

    Raises:
        ConfigError: If the file is missing, unparsable or not a table.
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
    unknown = sorted(set(data) - set(RunConfig.model_fields) - {"sources"})
    if unknown:
        raise ConfigError(f"config file {str(p)!r} has unknown settings: {', '.join(unknown)}")
    return data


def resolve_run_config(
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    read_env: bool = True,
) -> RunConfig:
    """Resolve a :class:`RunConfig` from defaults, a file, the environment and overrides.

    Args:
        config_file: Optional TOML/JSON file.
        overrides: Explicit values (from the CLI); ``None`` values are ignored.
        read_env: Read ``EMBEDDER_*`` variables (tests may turn this off).

    Returns:
        The validated config, with ``sources`` naming each value's origin.

    Raises:
        ConfigError: If any layer holds an invalid value.
    """
    merged: dict[str, Any] = {}
    sources: dict[str, SettingSource] = {name: "default" for name in RunConfig.model_fields if name != "sources"}
    if config_file is not None:
        for key, value in load_config_file(config_file).items():
            merged[key] = value
            sources[key] = "file"
    if read_env:
        try:
            env = EmbedderSettings()
        except ValidationError as exc:
            raise ConfigError(f"invalid EMBEDDER_* environment variable: {exc}") from exc
        for key in env.model_fields_set:
            merged[key] = getattr(env, key)
            sources[key] = "env"
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        merged[key] = value
        sources[key] = "cli"
    try:
        return RunConfig(**merged, sources=sources)
    except ValidationError as exc:
        raise ConfigError(f"invalid run configuration: {exc}") from exc
