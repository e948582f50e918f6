"""CrossEncoder rerank over fused candidates for real queries."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedder.batching import BatchPlan, run_batched
from embedder.errors import ModelUnavailableError
from embedder.gpu import PeakMeter, exclusive_device, plan_batch_size
from embedder.models.registry import ResolvedModel
from embedder.schemas import CrossEncoderRerankRun, Query, ScoredCandidate, StageTelemetry, apply_query_policy

_CACHE: dict[tuple[str, int], Any] = {}
_LOCK = threading.Lock()


class RerankEncoder:
    """A lazily loaded sentence-transformers CrossEncoder (HF id or local dir)."""

    def __init__(self, resolved: ResolvedModel, device: str = "cpu", *, max_length: int | None = None,
                 local_files_only: bool = False) -> None:
        self.resolved = resolved
        self.device = device
        self.max_length = max_length or resolved.spec.max_length
        self.local_files_only = local_files_only or resolved.is_local
        self._model: Any = None

    @property
    def name(self) -> str:
        """The registry name (or local path) of the model."""
        return self.resolved.spec.name

    def load(self) -> Any:
        """Load once per process; a second call is a no-op."""
        if self._model is not None:
            return self._model
        key = (self.resolved.location, self.max_length)
        with _LOCK:
            if key not in _CACHE:
                from sentence_transformers import CrossEncoder

                try:
                    model = CrossEncoder(self.resolved.location, device="cpu", local_files_only=self.local_files_only)
                except Exception as exc:
                    hint = ("pass a local directory or unset --local-files-only" if self.local_files_only
                            else "check the model id, or pass a local directory")
                    raise ModelUnavailableError(
                        f"rerank model {self.name!r} could not be loaded ({type(exc).__name__}: {exc}); {hint}"
                    ) from exc
                model.max_seq_length = effective_max_length(model, self.max_length)
                _CACHE[key] = model
            self._model = _CACHE[key]
        return self._model

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Relevance scores for ``(query, document)`` pairs, one batch."""
        model = self.load()
        scores = model.predict(list(pairs), batch_size=max(1, len(pairs)), show_progress_bar=False,
                               convert_to_numpy=True)
        return [float(s) for s in np.asarray(scores, dtype=np.float32).reshape(-1)]


def effective_max_length(model: Any, requested: int) -> int:
    """The longest input the model can take: the smallest of the request, the tokenizer's limit
    and the position embeddings. Truncating to it keeps over-length pairs from crashing the model."""
    limits = [requested]
    tokenizer_max = getattr(getattr(model, "tokenizer", None), "model_max_length", None)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < 1_000_000:  # HF uses 1e30 for "unset"
        limits.append(tokenizer_max)
    config = getattr(getattr(model, "transformers_model", None), "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits)


def default_rerank_batch(device: str, ceiling_gb: float, max_length: int) -> BatchPlan:
    """A batch plan for a BERT-base sized cross-encoder under ``ceiling_gb``."""
    size = plan_batch_size(device, ceiling_gb, per_item_mb=0.03 * max(max_length, 16), model_gb=1.5,
                           cpu_default=32, cap=512)
    return BatchPlan(size=size, floor=1)


@dataclass
class RerankResult:
    """Reranked lists per query id, the per-query runs, telemetry and warnings."""

    results: dict[str, list[ScoredCandidate]]
    runs: list[CrossEncoderRerankRun]
    telemetry: StageTelemetry
    warnings: list[str] = field(default_factory=list)


Work = list[tuple[Query, list[ScoredCandidate]]]
Passes = list[tuple[list[float], float]]


def _score_pooled(work: Work, texts: Mapping[str, str], encoder: RerankEncoder, batch: BatchPlan,
                  meter: PeakMeter) -> tuple[Passes, int, list[int]]:
    """Score every query's pairs in one length-sorted stream (as CrossEncoder.predict does),
    so batches pad to similar lengths; each query's latency is the measured time of its pairs."""
    pairs = [(qi, ci) for qi, (_, cands) in enumerate(work) for ci in range(len(cands))]

    def text_pair(p: tuple[int, int]) -> tuple[str, str]:
        query, cands = work[p[0]]
        return query.text, texts[cands[p[1]].id]

    order = sorted(range(len(pairs)), key=lambda i: -sum(len(t) for t in text_pair(pairs[i])))
    pair_ms = [0.0] * len(pairs)

    def score(start: int, end: int) -> list[float]:
        t0 = time.perf_counter()
        out = encoder.score_pairs([text_pair(pairs[i]) for i in order[start:end]])
        per_pair = (time.perf_counter() - t0) * 1000 / max(1, end - start)
        for i in order[start:end]:
            pair_ms[i] = per_pair
        return out

    run = run_batched(len(pairs), score, batch, device=encoder.device, on_progress=lambda *_: meter.sample())
    scores = [0.0] * len(pairs)
    for rank, i in enumerate(order):
        scores[i] = run.outputs[rank]
    passes: Passes = []
    offset = 0
    for _, cands in work:
        span = range(offset, offset + len(cands))
        passes.append(([scores[i] for i in span], sum(pair_ms[i] for i in span)))
        offset += len(cands)
    return passes, run.final_batch_size, run.backoffs


def _score_per_query(work: Work, texts: Mapping[str, str], encoder: RerankEncoder, batch: BatchPlan,
                     meter: PeakMeter, budget_ms: float) -> tuple[Passes, int, list[int]]:
    """Score query by query in fused order, cutting a query's tail when its budget would overrun."""
    passes: Passes = []
    backoffs: list[int] = []
    size = batch.size
    for query, cands in work:
        pairs = [(query.text, texts[c.id]) for c in cands]
        t0 = time.perf_counter()

        def should_stop(done: int, _t0: float = t0, _n: int = len(pairs)) -> bool:
            elapsed_ms = (time.perf_counter() - _t0) * 1000
            return elapsed_ms + elapsed_ms / done * (_n - done) > budget_ms

        run = run_batched(len(pairs), lambda s, e, _pairs=pairs: encoder.score_pairs(_pairs[s:e]),
                          BatchPlan(size, batch.floor),
                          device=encoder.device, on_progress=lambda *_: meter.sample(), should_stop=should_stop)
        backoffs.extend(run.backoffs)
        size = run.final_batch_size
        passes.append((list(run.outputs), (time.perf_counter() - t0) * 1000))
    return passes, size, backoffs


def rerank(
    queries: Sequence[Query],
    candidates: Mapping[str, Sequence[ScoredCandidate]],
    texts: Mapping[str, str],
    encoder: RerankEncoder,
    *,
    top_k_candidates: int = 100,
    top_k: int = 20,
    batch: BatchPlan,
    latency_budget_ms: float | None = None,
    query_policy_mode: str = "truncate",
    query_max_chars: int = 200,
    run_id: uuid.UUID | None = None,
) -> RerankResult:
    """Rescore each real query's top fused candidates with the CrossEncoder.

    Args:
        queries: The run's real queries (never invented).
        candidates: Fused candidates per query id, best first.
        texts: Chunk text per id.
        encoder: The cross-encoder.
        top_k_candidates: How many fused candidates to rescore per query.
        top_k: How many reranked results to keep per query.
        batch: Starting batch size and OOM floor.
        latency_budget_ms: Per-query budget. Queries are then scored one by one in
            fused order; after each batch the measured per-pair latency predicts
            the rest, and candidates that would overrun are cut with a warning
            saying how many. Without a budget, all pairs are scored in one
            length-sorted stream for throughput.
        query_policy_mode: ``truncate`` or ``hash`` for the stored query.
        query_max_chars: Characters kept by ``truncate``.
        run_id: The run's id.

    Returns:
        The reranked lists, one CrossEncoderRerankRun per query, telemetry and warnings.
    """
    model = encoder.load()
    rid = run_id or uuid.uuid4()
    results: dict[str, list[ScoredCandidate]] = {}
    runs: list[CrossEncoderRerankRun] = []
    warnings: list[str] = []
    total_pairs = 0
    meter = PeakMeter(encoder.device)
    t_stage = time.perf_counter()
    work = []
    for query in queries:
        cands = [c for c in list(candidates.get(query.id, []))[:top_k_candidates] if c.id in texts]
        if not cands:
            results[query.id] = []
        else:
            work.append((query, cands))
    with exclusive_device(model, encoder.device):
        meter.start()
        if latency_budget_ms is None:
            passes, final_batch, backoffs = _score_pooled(work, texts, encoder, batch, meter)
        else:
            passes, final_batch, backoffs = _score_per_query(work, texts, encoder, batch, meter, latency_budget_ms)
    for (query, cands), (scores, latency_ms) in zip(work, passes):
        scored_ids = [c.id for c in cands[: len(scores)]]
        dropped = len(cands) - len(scored_ids)
        if dropped:
            warnings.append(
                f"rerank latency budget {latency_budget_ms:.0f} ms: dropped {dropped} of {len(cands)} "
                f"candidates for query {query.id!r}"
            )
        total_pairs += len(scored_ids)
        order = sorted(range(len(scored_ids)), key=lambda i: (-scores[i], i))
        results[query.id] = [ScoredCandidate(id=scored_ids[i], score=scores[i]) for i in order][:top_k]
        runs.append(CrossEncoderRerankRun(
            run_id=rid, query=apply_query_policy(query.text, query_policy_mode, query_max_chars),
            query_id=query.id, candidate_ids=scored_ids, batch_size=final_batch, scores=list(scores),
            latency_ms=latency_ms, gpu_peak_gb=meter.peak_gb(), candidates_dropped=dropped,
        ))
    elapsed = time.perf_counter() - t_stage
    if backoffs:
        warnings.append(f"rerank batch backed off after OOM: {' -> '.join(map(str, backoffs + [final_batch]))}")
    telemetry = StageTelemetry(
        stage="rerank", model=encoder.name, device=encoder.device, batch_size=final_batch,
        initial_batch_size=batch.size, backoffs=backoffs, items=total_pairs, latency_ms=elapsed * 1000,
        items_per_s=total_pairs / elapsed if elapsed > 0 else 0.0,
        gpu_peak_gb=max((r.gpu_peak_gb for r in runs), default=0.0), warnings=warnings,
    )
    return RerankResult(results=results, runs=runs, telemetry=telemetry, warnings=warnings)
