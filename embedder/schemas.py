"""Typed records that cross module boundaries: chunks, vectors, candidates and stage payloads."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Chunk(BaseModel):
    """One validated text chunk."""

    model_config = ConfigDict(frozen=True)

    id: str
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class Reject(BaseModel):
    """A record that could not be used, and why. Written to ``rejects.jsonl``."""

    source: str
    line: int | None = Field(None, description="1-based line (JSONL) or 0-based row/list index.")
    id: str | None = None
    reason: str
    excerpt: str | None = Field(None, description="At most 200 characters of the raw record.")


class SparseVector(BaseModel):
    """A sparse vector with parallel ``indices`` and ``values``."""

    indices: list[int] = Field(default_factory=list)
    values: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _same_length(self) -> SparseVector:
        if len(self.indices) != len(self.values):
            raise ValueError("indices and values must have the same length")
        return self

    @property
    def nnz(self) -> int:
        """Number of non-zero entries."""
        return len(self.indices)


class ScoredCandidate(BaseModel):
    """A document id with a score from one retriever, fusion or rerank."""

    id: str
    score: float


class Query(BaseModel):
    """A real query from the run's query set."""

    id: str
    text: str


class CrossEncoderRerankRun(BaseModel):
    """Telemetry and export payload of one CrossEncoder rerank pass (one query)."""

    run_id: uuid.UUID
    query: str = Field(description="Query text, truncated or hashed per the query policy.")
    query_id: str | None = None
    candidate_ids: list[str]
    batch_size: int = Field(ge=1)
    scores: list[float]
    latency_ms: float = Field(ge=0)
    gpu_peak_gb: float = Field(ge=0)
    candidates_dropped: int = Field(0, ge=0, description="Candidates cut by the latency budget.")

    @model_validator(mode="after")
    def _aligned(self) -> CrossEncoderRerankRun:
        if len(self.candidate_ids) != len(self.scores):
            raise ValueError("candidate_ids and scores must have the same length")
        return self


class SparseInferenceRun(BaseModel):
    """Telemetry and export payload of one live sparse inference pass."""

    run_id: uuid.UUID
    sparse_model: str
    query_sparse_vector: SparseVector | None = Field(
        None, description="The first real query's vector, when queries were given."
    )
    document_sparse_vectors: list[SparseVector] | dict[str, Any] = Field(
        default_factory=list, description="Per-chunk vectors, or a summary with the export path when large."
    )
    latency_ms: float = Field(ge=0)
    fallback_used: bool
    fallback_count: int = Field(0, ge=0)
    coverage_ratio: float = Field(1.0, ge=0, le=1)


class StageRef(BaseModel):
    """A small reference to a stage's output file: what Prefect results carry instead of arrays."""

    model_config = ConfigDict(frozen=True)

    path: str
    digest: str = Field(description="sha256 of the file's bytes.")
    items: int = Field(0, ge=0)

    @field_validator("digest")
    @classmethod
    def _hex(cls, value: str) -> str:
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("digest must be a lowercase sha256 hex string")
        return value


def apply_query_policy(text: str, mode: str, max_chars: int) -> str:
    """Return the form of a query that may be stored, per the query policy.

    Args:
        text: The raw query.
        mode: ``"truncate"`` or ``"hash"``.
        max_chars: Characters kept by ``truncate``.

    Returns:
        The truncated text, or ``"sha256:<hex>"``.
    """
    if mode == "hash":
        return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
    return text[:max_chars]


class StageTelemetry(BaseModel):
    """Figures one stage reports: the row of its Prefect table artifact and of ``telemetry.stages``."""

    stage: str
    model: str | None = None
    device: str = "cpu"
    batch_size: int | None = None
    initial_batch_size: int | None = None
    backoffs: list[int] = Field(default_factory=list, description="Batch sizes that hit OOM, in order.")
    items: int = Field(0, description="Items this stage computed.")
    reused: int = Field(0, description="Items taken from the per-chunk store instead of computed.")
    latency_ms: float = 0.0
    items_per_s: float = 0.0
    gpu_peak_gb: float = Field(0.0, description="This process's device memory at its peak (NVML, CUDA context "
                               "included); 0.0 on the CPU.")
    torch_peak_gb: float = Field(0.0, description="torch's allocated peak (a part of gpu_peak_gb).")
    memory_source: str | None = Field(None, description="Where gpu_peak_gb comes from: nvml, or "
                                      "torch-reserved+context where NVML cannot see the process.")
    precision: str | None = Field(None, description="fp32, fp16 or bf16: what the model ran in.")
    batch_policy: str | None = Field(None, description="tokens (padded-token budget) or items (row count).")
    token_budget: int | None = Field(None, description="Padded tokens per batch at the end (after any back-off).")
    initial_token_budget: int | None = None
    batches: int | None = None
    padding_ratio: float | None = Field(None, description="Padded tokens per real token.")
    gpu_work_s: float | None = Field(None, description="Time the device spent on this stage's batches.")
    model_load_s: float | None = Field(None, description="Time this stage spent loading its model (0 when the "
                                       "process had it loaded; None when the stage needed no model).")
    tokenise_s: float | None = Field(None, description="Tokenisation time, overlapped with the device's work.")
    fallback: bool = False
    cached: bool = False
    warnings: list[str] = Field(default_factory=list)
