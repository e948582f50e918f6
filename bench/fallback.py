"""The sparse metadata fallback, measured on SciFact: how much of live BM25 it retains.

The earlier pipeline (rag_clean) kept each chunk's top terms only: its
``sparse_features`` hold ``term_weights`` (the 20 most frequent non-stopword
terms, with ``tf`` and ``weight = tf / total_terms``), ``top_terms``,
``unique_terms``, ``total_terms`` and ``weighting: "tf"``. This bench builds that
metadata for every SciFact abstract the same way, then compares, over the train
queries with Qdrant's IDF scoring (``embedder.fusion.SparseIndex``):

- ``live``: fastembed's BM25 document vectors, the real model;
- ``fallback``: :meth:`embedder.models.sparse.Bm25Terms.from_term_weights`, the
  vectors the pipeline derives from that metadata when the model is unavailable
  (the same tokenising, stemming and hashing, length-normalised by ``total_terms``);
- ``fallback+share^a``: the fallback with each vector scaled by
  ``(total_terms / kept tf)^a``, crediting a chunk for the share of its terms the
  metadata dropped. ``a`` is chosen on the odd train queries and reported on the
  even ones; the pipeline ships ``FALLBACK_SHARE_EXPONENT`` (``fallback`` below is
  the unscaled vector, ``share=0``).

It reports nDCG@10 and Recall@100 of each, the retention ratio (fallback /
live), and the median index Jaccard and cosine between each chunk's fallback
and live vectors.

Usage: python bench/fallback.py [--top 20]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import SCIFACT, scifact_docs, scifact_queries, write_result  # noqa: E402


def rag_clean_features(text: str, stopwords: frozenset[str], top: int) -> dict:
    """``sparse_features`` as rag_clean wrote them: the ``top`` most frequent non-stopword terms, weighted by tf."""
    terms = [t for t in re.findall(r"\w+", text.lower()) if t not in stopwords and not t.isdigit()]
    counts = Counter(terms)
    total = len(terms)
    kept = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {"term_weights": [{"term": t, "tf": c, "weight": round(c / total, 6)} for t, c in kept],
            "top_terms": [t for t, _ in kept[:10]], "unique_terms": len(counts), "total_terms": total,
            "weighting": "tf"}


def _scale(vec, factor: float):
    from embedder.schemas import SparseVector

    return SparseVector.model_construct(indices=vec.indices, values=[v * factor for v in vec.values])


def _overlap(a, b) -> tuple[float, float]:
    ia, ib = set(a.indices), set(b.indices)
    jaccard = len(ia & ib) / len(ia | ib) if ia | ib else 1.0
    da, db = dict(zip(a.indices, a.values)), dict(zip(b.indices, b.values))
    dot = sum(v * db.get(i, 0.0) for i, v in da.items())
    na, nb = np.sqrt(sum(v * v for v in da.values())), np.sqrt(sum(v * v for v in db.values()))
    return jaccard, (dot / (na * nb) if na and nb else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=20, help="terms rag_clean kept per chunk")
    args = parser.parse_args()

    from fastembed import SparseTextEmbedding

    from embedder.fusion import SparseIndex
    from embedder.io.readers import read_qrels
    from embedder.models.registry import BUNDLED_DATA, resolve_model
    from embedder.models.sparse import FALLBACK_SHARE_EXPONENT, _to_sparse, bm25_terms
    from embedder.quality import evaluate

    docs = scifact_docs()
    qrels = read_qrels(str(SCIFACT / "qrels" / "train.tsv"))
    queries = [(q, t) for q, t in scifact_queries() if q in qrels]
    hasher = bm25_terms(str(BUNDLED_DATA / "bm25"))
    bm25 = SparseTextEmbedding("Qdrant/bm25", specific_model_path=resolve_model("qdrant-bm25", "sparse").location,
                               local_files_only=True)
    ids = [d for d, _ in docs]
    live = [_to_sparse(e.indices, e.values) for e in bm25.embed([t for _, t in docs], batch_size=256)]
    qvecs = [_to_sparse(e.indices, e.values) for e in bm25.query_embed([t for _, t in queries])]
    features = [rag_clean_features(t, hasher.stopwords, args.top) for _, t in docs]
    fallback = [hasher.from_term_weights(f["term_weights"], f["total_terms"], share_exponent=0) for f in features]
    kept_share = [sum(e["tf"] for e in f["term_weights"]) / f["total_terms"] if f["total_terms"] else 1.0
                  for f in features]

    def score(vectors, subset=None) -> dict[str, float]:
        index = SparseIndex(ids, vectors, use_idf=True)
        chosen = [(q, v) for (q, _), v in zip(queries, qvecs) if subset is None or q in subset]
        judged = {q: qrels[q] for q, _ in chosen}
        out = evaluate({q: [c.id for c in index.search(v, 100)] for q, v in chosen}, judged)
        return {m: round(x, 4) for m, x in out.items()}

    odd = {q for i, (q, _) in enumerate(queries) if i % 2}
    even = {q for q, _ in queries} - odd
    variants = {}
    for a in (0.25, 0.5, 1.0):
        vecs = [_scale(v, (1 / s) ** a) if v is not None and s > 0 else v for v, s in zip(fallback, kept_share)]
        variants[a] = (vecs, score(vecs, odd)["ndcg@10"])
    best_a = max(variants, key=lambda a: variants[a][1])
    overlaps = [_overlap(f, v) for f, v in zip(fallback, live) if f is not None]
    report = {
        "docs": len(docs), "queries": len(queries), "top_terms_kept": args.top,
        "median_kept_share": round(statistics.median(kept_share), 3),
        "median_index_jaccard": round(statistics.median(o[0] for o in overlaps), 3),
        "median_cosine": round(statistics.median(o[1] for o in overlaps), 3),
        "live": score(live), "fallback": score(fallback),
        f"fallback+share^{FALLBACK_SHARE_EXPONENT} (shipped)": score(
            [hasher.from_term_weights(f["term_weights"], f["total_terms"]) for f in features]),
        "share_exponent_chosen_on_odd_queries": best_a,
        "odd_queries_ndcg@10_by_exponent": {str(a): round(v[1], 4) for a, v in variants.items()},
        "even_queries": {"live": score(live, even), "fallback": score(fallback, even),
                         f"fallback+share^{best_a}": score(variants[best_a][0], even)},
    }
    report["retention"] = round(report["fallback"]["ndcg@10"] / report["live"]["ndcg@10"], 3)
    ev = report["even_queries"]
    report["retention_even"] = {k: round(ev[k]["ndcg@10"] / ev["live"]["ndcg@10"], 3) for k in ev if k != "live"}
    shipped = report[f"fallback+share^{FALLBACK_SHARE_EXPONENT} (shipped)"]["ndcg@10"]
    report["retention_shipped"] = round(shipped / report["live"]["ndcg@10"], 3)
    report["command"] = f"python bench/fallback.py --top {args.top}"
    write_result("fallback", report)


if __name__ == "__main__":
    main()
