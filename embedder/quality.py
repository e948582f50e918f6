"""Retrieval quality: nDCG@k and Recall@k over BEIR-style qrels."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def ndcg_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int = 10) -> float:
    """nDCG@k with graded gains ``rel`` and log2 discounts (trec_eval's ndcg_cut)."""
    dcg = sum(relevant.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]) if relevant.get(doc, 0) > 0)
    ideal = sorted((r for r in relevant.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int = 100) -> float:
    """Fraction of the relevant documents found in the top k."""
    rel = {d for d, r in relevant.items() if r > 0}
    if not rel:
        return 0.0
    return len(rel.intersection(ranked[:k])) / len(rel)


def evaluate(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Mean nDCG@10 and Recall@100 over the queries that have judgements.

    A judged query missing from ``run`` counts as 0 (as trec_eval does with -c).
    """
    judged = [q for q, rels in qrels.items() if any(r > 0 for r in rels.values())]
    if not judged:
        return {"ndcg@10": 0.0, "recall@100": 0.0, "queries": 0}
    ndcg = sum(ndcg_at_k(run.get(q, []), qrels[q], 10) for q in judged) / len(judged)
    recall = sum(recall_at_k(run.get(q, []), qrels[q], 100) for q in judged) / len(judged)
    return {"ndcg@10": ndcg, "recall@100": recall, "queries": float(len(judged))}
