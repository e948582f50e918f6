"""Fusion variants beyond the shipped ones, scored on a run's own candidate lists (SciFact train).

The shipped fusion is Qdrant's: RRF and DBSF (each list's scores mapped through
``mean ± 3 sd``), with per-list weights fitted by ``eval --tune``. This bench
asks whether another score normalisation or a shallower list would have done
better on the same lists, before anything is shipped for it. Each variant is
scored with the weights the packaged recommendation uses
(``embedder/data/recommended_fusion.toml``) and with the best weights of a grid
(``--grid``), so a variant is not judged by weights fitted to another.

Variants: DBSF with ``mean ± c sd`` for c in 1, 1.5, 2, 3; min-max; z-score;
divide-by-max; and DBSF over each list's top 10, 20, 30, 50 of its 100.

Reads the fusion stage's ``candidates.jsonl`` of an eval run over dense +
BM25 + SPLADE-tiny, e.g. after::

    embed-collections eval --beir-dir ../shared/datasets/scifact --split train --output-dir output/eval \\
        --json --local-files-only --sparse-models qdrant-bm25,splade-tiny --disable-rerank

Usage: python bench/fusion_variants.py --candidates output/eval/beir-scifact-train/.stages/fuse/<key>/candidates.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SCIFACT, write_result  # noqa: E402
from embedder.io.readers import read_qrels  # noqa: E402
from embedder.quality import ndcg_at_k  # noqa: E402
from embedder.tuning import QueryLists, query_lists  # noqa: E402

Normalise = Callable[[Sequence[float]], list[float]]


def _sd(s: Sequence[float]) -> tuple[float, float]:
    mean = sum(s) / len(s)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in s) / max(len(s) - 1, 1))


def dbsf(c: float) -> Normalise:
    """Scores mapped through ``mean ± c sd`` (c = 3: Qdrant's DBSF)."""
    def norm(s: Sequence[float]) -> list[float]:
        mean, sd = _sd(s)
        if sd == 0:
            return [0.5] * len(s)
        return [(x - (mean - c * sd)) / (2 * c * sd) for x in s]
    return norm


def minmax(s: Sequence[float]) -> list[float]:
    lo, hi = min(s), max(s)
    return [(x - lo) / ((hi - lo) or 1.0) for x in s]


def zscore(s: Sequence[float]) -> list[float]:
    mean, sd = _sd(s)
    return [(x - mean) / (sd or 1.0) for x in s]


def by_max(s: Sequence[float]) -> list[float]:
    return [x / (s[0] or 1.0) for x in s]


def mean_ndcg(queries: Sequence[QueryLists], qrels: Mapping[str, Mapping[str, int]], names: Sequence[str],
              norm: Normalise, weights: Mapping[str, float], depth: int) -> float:
    """Mean nDCG@10 of a weighted sum of normalised scores over each list's top ``depth``."""
    total = 0.0
    for q in queries:
        acc: dict[str, float] = {}
        for name in names:
            lst = q.lists.get(name, [])[:depth]
            if not lst or not weights.get(name):
                continue
            for c, v in zip(lst, norm([c.score for c in lst])):
                acc[c.id] = acc.get(c.id, 0.0) + weights[name] * v
        total += ndcg_at_k(sorted(acc, key=lambda i: -acc[i])[:10], qrels[q.query_id])
    return total / len(queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=Path, required=True)
    parser.add_argument("--qrels", type=Path, default=SCIFACT / "qrels" / "train.tsv")
    parser.add_argument("--grid", default="0,0.5,1,1.5,2,3", help="weights tried for each sparse list (dense: 2)")
    args = parser.parse_args()

    qrels = read_qrels(args.qrels)
    queries = [q for q in query_lists([json.loads(line) for line in args.candidates.open()]) if qrels.get(q.query_id)]
    names = list(queries[0].lists)
    shipped_file = Path(__file__).resolve().parent.parent / "embedder" / "data" / "recommended_fusion.toml"
    shipped = tomllib.loads(shipped_file.read_text())["embedder"]["fuse"]["weights"]
    grid = [float(x) for x in args.grid.split(",")]
    variants: dict[str, tuple[Normalise, int]] = {
        **{f"dbsf_sd{c:g}": (dbsf(c), 100) for c in (1, 1.5, 2, 3)},
        "minmax": (minmax, 100), "zscore": (zscore, 100), "by_max": (by_max, 100),
        **{f"dbsf_top{d}": (dbsf(3), d) for d in (10, 20, 30, 50)},
    }
    rows = {}
    for label, (norm, depth) in variants.items():
        at_shipped = mean_ndcg(queries, qrels, names, norm, shipped, depth)
        best, best_w = at_shipped, dict(shipped)
        for combo in itertools.product(grid, repeat=len(names) - 1):
            w = {"dense": 2.0, **dict(zip(names[1:], combo))}
            score = mean_ndcg(queries, qrels, names, norm, w, depth)
            if score > best + 1e-9:
                best, best_w = score, w
        rows[label] = {"ndcg@10_shipped_weights": round(at_shipped, 4), "ndcg@10_best_grid": round(best, 4),
                       "best_weights": best_w}
        print(label, rows[label], flush=True)
    write_result("fusion_variants", {
        "command": f"python bench/fusion_variants.py --candidates {args.candidates} --grid {args.grid}",
        "split": args.qrels.stem, "queries": len(queries), "lists": names, "shipped_weights": shipped,
        "note": "dbsf_sd3 at the shipped weights is the shipped configuration; every other row is a variant",
        "variants": rows,
    })


if __name__ == "__main__":
    main()
