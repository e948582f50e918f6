"""CrossEncoder rerank over fused candidates for real queries."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedder.batching import BatchPlan, run_batched
from embedder.errors import ModelUnavailableError
from embedder.gpu import PeakMeter, exclusive_device
from embedder.lease import GpuLease, gpu_work
from embedder.models.engine import Engine, ModelShape, TokenBudget, cast_model, rerank_forward, rerank_preprocess
from embedder.models.loading import loaded
from embedder.models.registry import ResolvedModel
from embedder.schemas import CrossEncoderRerankRun, Query, ScoredCandidate, StageTelemetry, apply_query_policy
from embedder.summary import LeaseEvent


class RerankEncoder:
    """A lazily loaded sentence-transformers CrossEncoder (HF id or local dir)."""

    def __init__(self, resolved: ResolvedModel, device: str = "cpu", *, max_length: int | None = None,
                 local_files_only: bool = False, precision: str = "fp32") -> None:
        self.resolved = resolved
        self.device = device
        self.precision = precision
        self.max_length = max_length or resolved.spec.max_length
        self.local_files_only = local_files_only or resolved.is_local
        self._model: Any = None

    @property
    def name(self) -> str:
        """The registry name (or local path) of the model."""
        return self.resolved.spec.name

    def load(self) -> Any:
        """Load once per process and precision (cast on the CPU); a second call is a no-op."""
        if self._model is not None:
            return self._model
        def build() -> Any:
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
            return cast_model(model, self.precision)

        self._model = loaded(("rerank", self.resolved.location, self.max_length, self.precision), build)
        return self._model

    def shape(self) -> ModelShape:
        """The loaded model's shape (for its token budget)."""
        model = self.load()
        return ModelShape.of(model, max_length=int(model.max_seq_length or self.max_length))

    def engine(self, budget: TokenBudget) -> Engine[tuple[str, str]]:
        """A token-budget engine over this model (which must already sit on ``self.device``)."""
        model = self.load()
        return Engine(model, self.device, budget, forward=rerank_forward(model), preprocess=rerank_preprocess(model))

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


@dataclass
class RerankResult:
    """Reranked lists per query id, the per-query runs, telemetry and warnings."""

    results: dict[str, list[ScoredCandidate]]
    runs: list[CrossEncoderRerankRun]
    telemetry: StageTelemetry
    warnings: list[str] = field(default_factory=list)
    lease_event: LeaseEvent | None = None


Work = list[tuple[Query, list[ScoredCandidate]]]
Passes = list[tuple[list[float], float]]


def _score_pooled(work: Work, texts: Mapping[str, str], encoder: RerankEncoder, budget: TokenBudget,
                  meter: PeakMeter, window: int) -> tuple[Passes, Engine[tuple[str, str]]]:
    """Score every query's pairs pooled across queries, in windows cut into token-budget batches.

    Pooling fills every batch whatever the number of candidates per query; each
    query's latency is its share of the measured time of the windows its pairs fell in.
    """
    pairs = [(query.text, texts[c.id]) for query, cands in work for c in cands]
    engine = encoder.engine(budget)
    spans = [(s, min(len(pairs), s + window)) for s in range(0, len(pairs), window)]
    scores = np.zeros(len(pairs), dtype=np.float32)
    pair_ms = np.zeros(len(pairs))
    t_prev = time.perf_counter()
    meter.start()
    for (s, e), out in engine.map(spans, lambda span: pairs[span[0]:span[1]]):
        scores[s:e] = out.numpy()
        now = time.perf_counter()
        pair_ms[s:e] = (now - t_prev) * 1000 / max(1, e - s)
        t_prev = now
    meter.stop()
    passes: Passes = []
    offset = 0
    for _, cands in work:
        span = slice(offset, offset + len(cands))
        passes.append((scores[span].tolist(), float(pair_ms[span].sum())))
        offset += len(cands)
    return passes, engine


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

        def score(s: int, e: int, _pairs: list[tuple[str, str]] = pairs) -> list[float]:
            return encoder.score_pairs(_pairs[s:e])

        def sample(done: int, total: int) -> None:
            meter.sample()

        run = run_batched(len(pairs), score, BatchPlan(size, batch.floor), device=encoder.device,
                          on_progress=sample, should_stop=should_stop)
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
    budget: Callable[[], TokenBudget],
    top_k_candidates: int = 100,
    top_k: int = 20,
    latency_budget_ms: float | None = None,
    query_policy_mode: str = "truncate",
    query_max_chars: int = 200,
    run_id: uuid.UUID | None = None,
    window: int = 4096,
    gpu: GpuLease | None = None,
) -> RerankResult:
    """Rescore each real query's top fused candidates with the CrossEncoder.

    Args:
        queries: The run's real queries (never invented).
        candidates: Fused candidates per query id, best first.
        texts: Chunk text per id.
        encoder: The cross-encoder (loaded here, before any lease).
        budget: Plans the batch budget; called on the device, inside the lease.
        top_k_candidates: How many fused candidates to rescore per query.
        top_k: How many reranked results to keep per query.
        latency_budget_ms: Per-query budget. Queries are then scored one by one in
            fused order in row batches; after each batch the measured per-pair
            latency predicts the rest, and candidates that would overrun are cut
            with a warning saying how many. Without a budget, every query's pairs
            are pooled into token-budget batches for throughput.
        query_policy_mode: ``truncate`` or ``hash`` for the stored query.
        query_max_chars: Characters kept by ``truncate``.
        run_id: The run's id.
        window: Pairs tokenised at once (the next window is tokenised while the device scores this one).
        gpu: A factory of the GPU lease context manager (yielding its event), entered only around scoring.

    Returns:
        The reranked lists, one CrossEncoderRerankRun per query, telemetry, warnings and the lease event.
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
    engine = None
    planned = None
    with gpu_work(gpu, needed=bool(work)) as holding:
        with exclusive_device(model, encoder.device):
            planned = budget()
            if latency_budget_ms is None:
                passes, engine = _score_pooled(work, texts, encoder, planned, meter, window)
                final_batch = engine.report("rerank")[0]["batch_size"]
            else:
                meter.start()
                passes, final_batch, backoffs = _score_per_query(
                    work, texts, encoder, BatchPlan(planned.max_items), meter, latency_budget_ms)
                meter.stop()
    for (query, cands), (scores, latency_ms) in zip(work, passes if work else []):
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
    if engine is not None:
        batching, backoff = engine.report("rerank")
    else:  # per-query row batches under a latency budget
        batching = {"batch_policy": "items", "batch_size": final_batch, "backoffs": list(backoffs),
                    "initial_batch_size": planned.max_items if planned else None}
        backoff = ([f"rerank batch backed off after OOM: {' -> '.join(map(str, [*backoffs, final_batch]))} rows"]
                   if backoffs else [])
    warnings.extend(backoff)
    telemetry = StageTelemetry(
        stage="rerank", model=encoder.name, device=encoder.device, items=total_pairs,
        latency_ms=elapsed * 1000, items_per_s=total_pairs / elapsed if elapsed > 0 else 0.0,
        gpu_peak_gb=meter.peak_gb(), torch_peak_gb=meter.torch_peak_gb(), memory_source=meter.memory_source(),
        precision=encoder.precision, warnings=warnings, **batching,
    )
    return RerankResult(results=results, runs=runs, telemetry=telemetry, warnings=warnings,
                        lease_event=holding.event() if holding is not None else None)
