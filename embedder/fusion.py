"""Dense + sparse fusion (RRF, DBSF) and in-memory candidate retrieval. Pure functions.

The formulas match Qdrant's Query API so that in-memory fusion and Qdrant's
``prefetch`` + ``FusionQuery`` agree on the same candidate lists:

- RRF: ``score(d) = sum_i 1 / (k + rank_i(d))`` with 1-based ranks (Cormack et al.). Qdrant
  counts positions from 0, so :func:`embedder.io.qdrant.hybrid_query` passes it ``k + 1``.
- DBSF: each list's scores are mapped through ``(s - (mean - 3 sd)) / (6 sd)``
  (sample sd; a single score or zero variance maps to 0.5), then summed.

Both take any number of lists (dense plus every sparse model) and optional
per-list weights. Weighted RRF follows Qdrant's ``Fusion.Rrf(k, weights)``: a
weight scales the *rank*, ``sum_i 1 / (k + rank_i(d) / w_i)``, so a list of
weight 2 counts its 2nd document as another list's 1st (weight 1 is plain RRF;
weight 0 leaves the list out). Weighted DBSF sums ``w_i`` times each normalised
score (Qdrant's DBSF has no weights, so weighted DBSF runs here only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from embedder.schemas import ScoredCandidate, SparseVector


def _ranked(scores: Mapping[str, float], first_seen: Mapping[str, int]) -> list[ScoredCandidate]:
    # Ties break by first appearance, then id, so results are deterministic.
    order = sorted(scores, key=lambda d: (-scores[d], first_seen[d], d))
    return [ScoredCandidate(id=d, score=scores[d]) for d in order]


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n or any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"expected {n} finite, non-negative weights (one per list), got {list(weights)}")
    return [float(w) for w in weights]


def fuse_rrf(lists: Sequence[Sequence[str]], k: int = 60,
             weights: Sequence[float] | None = None) -> list[ScoredCandidate]:
    """Reciprocal rank fusion of ranked id lists, optionally weighted per list.

    Args:
        lists: Each a list of ids, best first. Duplicates within a list count once (first rank).
        k: The rank constant.
        weights: One non-negative weight per list (default: all 1).

    Returns:
        Fused candidates, best first.
    """
    if k < 0:
        raise ValueError("k must be >= 0")
    w = _weights(weights, len(lists))
    scores: dict[str, float] = {}
    first_seen: dict[str, int] = {}
    pos = 0
    for ranked, weight in zip(lists, w):
        if weight == 0:
            continue
        seen: set[str] = set()
        for rank, doc_id in enumerate(ranked, start=1):
            if doc_id in seen:
                continue
            seen.add(doc_id)
            scores[doc_id] = scores.get(doc_id, 0.0) + 1.0 / (k + rank / weight)
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


def fuse_dbsf(scored_lists: Sequence[Sequence[ScoredCandidate]],
              weights: Sequence[float] | None = None) -> list[ScoredCandidate]:
    """Distribution-based score fusion of scored lists, optionally weighted per list.

    Args:
        scored_lists: Each a list of candidates with their raw retriever scores.
        weights: One non-negative weight per list (default: all 1).

    Returns:
        Fused candidates, best first.
    """
    w = _weights(weights, len(scored_lists))
    scores: dict[str, float] = {}
    first_seen: dict[str, int] = {}
    pos = 0
    for lst, weight in zip(scored_lists, w):
        if not lst or weight == 0:
            continue
        for cand, norm in zip(lst, _dbsf_normalise([c.score for c in lst])):
            scores[cand.id] = scores.get(cand.id, 0.0) + weight * norm
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


# --- streaming retrieval: the same lists as DenseIndex / SparseIndex, a window of documents at a time ---------


class _TopN:
    """The best ``top_n`` documents per query across windows, ties broken by document position as the indexes do."""

    def __init__(self, n_queries: int, top_n: int) -> None:
        self.top_n = top_n
        self.scores = np.zeros((n_queries, 0), dtype=np.float64)
        self.positions = np.zeros((n_queries, 0), dtype=np.int64)
        self.ids = np.zeros((n_queries, 0), dtype=object)

    def add(self, ids: Sequence[str], offset: int, scores: np.ndarray, candidate: np.ndarray | None = None) -> None:
        """Merge a window's ``scores`` (documents x queries); ``candidate`` masks documents a query can return."""
        n_q = self.scores.shape[0]
        if n_q == 0 or not len(ids):
            return
        window_scores = scores.T.astype(np.float64)
        if candidate is not None:
            window_scores = np.where(candidate.T, window_scores, -np.inf)
        window_pos = np.broadcast_to(np.arange(offset, offset + len(ids), dtype=np.int64), window_scores.shape)
        window_ids = np.broadcast_to(np.asarray(list(ids), dtype=object), window_scores.shape)
        all_scores = np.concatenate([self.scores, window_scores], axis=1)
        all_pos = np.concatenate([self.positions, window_pos], axis=1)
        all_ids = np.concatenate([self.ids, window_ids], axis=1)
        # Columns are in position order, so a stable sort on -score breaks ties by position.
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :self.top_n]
        keep_scores = np.take_along_axis(all_scores, order, axis=1)
        keep_pos = np.take_along_axis(all_pos, order, axis=1)
        keep_ids = np.take_along_axis(all_ids, order, axis=1)
        back = np.argsort(keep_pos, axis=1, kind="stable")  # back to position order for the next merge
        self.scores = np.take_along_axis(keep_scores, back, axis=1)
        self.positions = np.take_along_axis(keep_pos, back, axis=1)
        self.ids = np.take_along_axis(keep_ids, back, axis=1)

    def lists(self) -> list[list[ScoredCandidate]]:
        """Per query, its candidates best first."""
        out = []
        for q in range(self.scores.shape[0]):
            order = np.argsort(-self.scores[q], kind="stable")
            out.append([ScoredCandidate(id=self.ids[q, i], score=float(self.scores[q, i]))
                        for i in order if np.isfinite(self.scores[q, i])])
        return out


def stream_dense_candidates(windows: Iterable[tuple[Sequence[str], np.ndarray]], queries: np.ndarray,
                            top_n: int) -> list[list[ScoredCandidate]]:
    """Top ``top_n`` documents per query by cosine similarity, reading the documents a window at a time.

    Args:
        windows: ``(ids, normalised vectors)`` per window, in collection order.
        queries: One normalised query vector per row.
        top_n: Candidates per query.

    Returns:
        Per query, what :meth:`DenseIndex.search` returns over the whole collection.
    """
    q = np.asarray(queries, dtype=np.float32)
    best = _TopN(len(q), top_n)
    offset = 0
    for ids, vectors in windows:
        if len(ids):
            best.add(ids, offset, np.asarray(vectors, dtype=np.float32) @ q.T)
        offset += len(ids)
    return best.lists()


def stream_sparse_candidates(windows: Callable[[], Iterable[tuple[Sequence[str], Sequence[SparseVector | None]]]],
                             queries: Sequence[SparseVector], top_n: int, *,
                             use_idf: bool = True) -> list[list[ScoredCandidate]]:
    """Top ``top_n`` documents per query as :class:`SparseIndex` scores them, a window of documents at a time.

    Only the queries' terms matter, so the state is a column per query term:
    one pass counts their document frequencies (for IDF), a second scores each
    window as a sparse product.

    Args:
        windows: Returns a fresh iterator of ``(ids, vectors)`` windows in collection order (read twice with IDF).
        queries: The query vectors.
        top_n: Candidates per query.
        use_idf: Weight terms by ``ln(1 + (N - n_t + 0.5) / (n_t + 0.5))``, as Qdrant's ``Modifier.IDF``.
    """
    from scipy.sparse import csr_matrix

    terms = np.unique(np.asarray([t for v in queries for t in v.indices], dtype=np.int64))
    best = _TopN(len(queries), top_n)
    if not len(terms) or not len(queries):
        return best.lists()

    def matched(vectors: Sequence[SparseVector | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, cols, vals = [], [], []
        for r, v in enumerate(vectors):
            if v is None or not v.nnz:
                continue
            idx = np.asarray(v.indices, dtype=np.int64)
            pos = np.searchsorted(terms, idx)
            pos[pos >= len(terms)] = 0
            hit = terms[pos] == idx
            if hit.any():
                rows.append(np.full(int(hit.sum()), r, dtype=np.int64))
                cols.append(pos[hit])
                vals.append(np.asarray(v.values, dtype=np.float64)[hit])
        if not rows:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0)
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)

    idf = np.ones(len(terms))
    if use_idf:
        df = np.zeros(len(terms), dtype=np.int64)
        n_docs = 0
        for _ids, vectors in windows():
            n_docs += sum(v is not None for v in vectors)
            _rows, cols, _vals = matched(vectors)
            df += np.bincount(cols, minlength=len(terms))
        idf = np.log(1 + (n_docs - df + 0.5) / (df + 0.5))
    weights = np.zeros((len(terms), len(queries)))
    present = np.zeros((len(terms), len(queries)))
    for qi, v in enumerate(queries):
        cols = np.searchsorted(terms, np.asarray(v.indices, dtype=np.int64))
        np.add.at(weights[:, qi], cols, np.asarray(v.values, dtype=np.float64) * idf[cols])
        present[cols, qi] = 1.0
    offset = 0
    for ids, vectors in windows():
        rows, cols, vals = matched(vectors)
        if len(rows):
            shape = (len(ids), len(terms))
            scores = csr_matrix((vals, (rows, cols)), shape=shape) @ weights
            shared = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=shape) @ present
            best.add(ids, offset, np.asarray(scores), np.asarray(shared) > 0)
        offset += len(ids)
    return best.lists()
