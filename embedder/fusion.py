"""Dense + sparse fusion (RRF, DBSF) and in-memory candidate retrieval. Pure functions.

The formulas match Qdrant's Query API so that in-memory fusion and Qdrant's
``prefetch`` + ``FusionQuery`` agree on the same candidate lists:

- RRF: ``score(d) = sum_i 1 / (k + rank_i(d))`` with 1-based ranks (Cormack et al.). Qdrant
  counts positions from 0, so :func:`embedder.io.qdrant.hybrid_query` passes it ``k + 1``.
- DBSF: each list's scores are mapped through ``(s - (mean - 3 sd)) / (6 sd)``
  (sample sd; a single score or zero variance maps to 0.5), then summed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from embedder.schemas import ScoredCandidate, SparseVector


def _ranked(scores: Mapping[str, float], first_seen: Mapping[str, int]) -> list[ScoredCandidate]:
    # Ties break by first appearance, then id, so results are deterministic.
    order = sorted(scores, key=lambda d: (-scores[d], first_seen[d], d))
    return [ScoredCandidate(id=d, score=scores[d]) for d in order]


def fuse_rrf(lists: Sequence[Sequence[str]], k: int = 60) -> list[ScoredCandidate]:
    """Reciprocal rank fusion of ranked id lists.

    Args:
        lists: Each a list of ids, best first. Duplicates within a list count once (first rank).
        k: The rank constant.

    Returns:
        Fused candidates, best first.
    """
    if k < 0:
        raise ValueError("k must be >= 0")
    scores: dict[str, float] = {}
    first_seen: dict[str, int] = {}
    pos = 0
    for ranked in lists:
        seen: set[str] = set()
        for rank, doc_id in enumerate(ranked, start=1):
            if doc_id in seen:
                continue
            seen.add(doc_id)
            scores[doc_id] = scores.get(doc_id, 0.0) + 1.0 / (k + rank)
            first_seen.setdefault(doc_id, pos)
            pos += 1
    return _ranked(scores, first_seen)


def _dbsf_normalise(scores: Sequence[float]) -> list[float]:
    n = len(scores)
    if n == 1:
        return [0.5]
    mean = sum(scores) / n
    variance = sum((s - mean) ** 2 for s in scores) / (n - 1)
    if variance == 0:
        return [0.5] * n
    sd = math.sqrt(variance)
    low, high = mean - 3 * sd, mean + 3 * sd
    return [(s - low) / (high - low) for s in scores]


def fuse_dbsf(scored_lists: Sequence[Sequence[ScoredCandidate]]) -> list[ScoredCandidate]:
    """Distribution-based score fusion of scored lists.

    Args:
        scored_lists: Each a list of candidates with their raw retriever scores.

    Returns:
        Fused candidates, best first.
    """
    scores: dict[str, float] = {}
    first_seen: dict[str, int] = {}
    pos = 0
    for lst in scored_lists:
        if not lst:
            continue
        for cand, norm in zip(lst, _dbsf_normalise([c.score for c in lst])):
            scores[cand.id] = scores.get(cand.id, 0.0) + norm
            first_seen.setdefault(cand.id, pos)
            pos += 1
    return _ranked(scores, first_seen)


class DenseIndex:
    """Normalised dense vectors in memory; cosine similarity is a dot product."""

    def __init__(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        self.ids = list(ids)
        self.vectors = np.asarray(vectors, dtype=np.float32)

    def search(self, query: np.ndarray, top_n: int) -> list[ScoredCandidate]:
        """Top ``top_n`` by cosine similarity."""
        if not self.ids:
            return []
        sims = self.vectors @ np.asarray(query, dtype=np.float32)
        top_n = min(top_n, len(self.ids))
        idx = np.argpartition(-sims, top_n - 1)[:top_n]
        idx = idx[np.lexsort((idx, -sims[idx]))]
        return [ScoredCandidate(id=self.ids[i], score=float(sims[i])) for i in idx]


class SparseIndex:
    """An inverted index over sparse vectors, scored with IDF as Qdrant's ``Modifier.IDF`` does.

    ``idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5))``; a document's score is
    ``sum_t q_t * idf(t) * d_t`` over shared terms.
    """

    def __init__(self, ids: Sequence[str], vectors: Sequence[SparseVector | None], *, use_idf: bool = True) -> None:
        self.ids = list(ids)
        self.postings: dict[int, list[tuple[int, float]]] = {}
        for doc, vec in enumerate(vectors):
            if vec is None:
                continue
            for term, value in zip(vec.indices, vec.values):
                self.postings.setdefault(term, []).append((doc, value))
        n_docs = sum(v is not None for v in vectors)
        self.idf = {
            t: (math.log(1 + (n_docs - len(p) + 0.5) / (len(p) + 0.5)) if use_idf else 1.0)
            for t, p in self.postings.items()
        }

    def search(self, query: SparseVector, top_n: int) -> list[ScoredCandidate]:
        """Top ``top_n`` documents sharing at least one term with the query."""
        scores: dict[int, float] = {}
        for term, q in zip(query.indices, query.values):
            weight = q * self.idf.get(term, 0.0)
            for doc, value in self.postings.get(term, ()):
                scores[doc] = scores.get(doc, 0.0) + weight * value
        best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]
        return [ScoredCandidate(id=self.ids[d], score=s) for d, s in best]


def retrieve_candidates(
    query: tuple[np.ndarray, Sequence[SparseVector]],
    dense_index: DenseIndex,
    sparse_index: Sequence[SparseIndex] | SparseIndex | None,
    top_n: int,
) -> list[list[ScoredCandidate]]:
    """Per-query candidate lists from in-memory indexes, for runs without Qdrant.

    Args:
        query: The query's dense vector and its sparse vector(s), one per sparse index.
        dense_index: Dense vectors of the collection.
        sparse_index: One sparse index per sparse model, or None for dense-only.
        top_n: Candidates per list.

    Returns:
        The dense list first, then one list per sparse index.
    """
    dense_q, sparse_qs = query
    lists = [dense_index.search(dense_q, top_n)]
    indexes = [sparse_index] if isinstance(sparse_index, SparseIndex) else list(sparse_index or [])
    for index, sq in zip(indexes, sparse_qs):
        lists.append(index.search(sq, top_n))
    return lists
