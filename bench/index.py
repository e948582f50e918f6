"""Index benchmark: Qdrant Edge against qdrant-client's local mode on the same points, in one run.

For each size it reports upsert points/s (through the project's own store
writers), the HNSW build time on Edge, hybrid (dense + BM25-like sparse with
IDF, prefetch + RRF) query latency p50/p95 for exact Edge, HNSW Edge and local
mode, and the top-10 agreement of Edge with local mode. It also measures Edge
upsert throughput per batch size, which sets ``index_batch_size``.

Points are synthetic but shaped like the pipeline's: 384-dim unit vectors drawn
around a few hundred topic centres, and sparse vectors with Zipf-distributed
term ids and BM25-like weights.

    python bench/index.py                      # 10k and 100k points (local mode at 100k takes minutes)
    python bench/index.py --sizes 2000 --queries 20   # a quick run
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_result  # noqa: E402
from embedder.io.edge_store import EdgeStore
from embedder.io.qdrant import point_id
from embedder.io.store import HybridQuery, IndexLayout, PointBatch, VectorStore
from embedder.io.stores import open_store
from embedder.schemas import SparseVector

DIM = 384
SPARSE = "sparse-qdrant-bm25"
LAYOUT = IndexLayout(DIM, ((SPARSE, True),))


def make_points(n: int, seed: int = 0) -> tuple[np.ndarray, list[SparseVector], list[str]]:
    """Dense rows around topic centres, Zipf sparse vectors and chunk ids."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, DIM)).astype(np.float32)
    dense = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    sparse = []
    for _ in range(n):
        terms = np.unique(np.minimum(rng.zipf(1.3, int(rng.integers(20, 80))), 2**31 - 1))
        tf = rng.integers(1, 5, len(terms)).astype(np.float32)
        sparse.append(SparseVector(indices=terms.tolist(), values=(tf * 2.2 / (tf + 1.2)).tolist()))
    return dense, sparse, [f"c{i}" for i in range(n)]


def batches(dense: np.ndarray, sparse: list[SparseVector], ids: list[str], size: int):
    for s in range(0, len(ids), size):
        part = ids[s:s + size]
        yield PointBatch(point_ids=[point_id("bench", c) for c in part], dense=dense[s:s + size],
                         sparse={SPARSE: sparse[s:s + size]}, payloads=[{"chunk_id": c} for c in part])


def load(store: VectorStore, dense: np.ndarray, sparse: list[SparseVector], ids: list[str],
         batch: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    writer = store.writer("bench", LAYOUT, incremental=False)
    for b in batches(dense, sparse, ids, batch):
        writer.upsert(b)
    t_upsert = time.perf_counter() - t0
    published = writer.publish()
    total = time.perf_counter() - t0
    return {"points": published.points_count, "batch": batch, "upsert_s": round(t_upsert, 3),
            "publish_s": round(total - t_upsert, 3), "hnsw_build_s": round(published.hnsw_build_s, 3),
            "search_mode": published.search_mode, "points_per_s": round(len(ids) / (total - published.hnsw_build_s), 1),
            "points_per_s_incl_hnsw": round(len(ids) / total, 1)}


def query_latency(store: VectorStore, queries: list[HybridQuery]) -> tuple[dict[str, float], list[list[str]]]:
    times, tops = [], []
    for q in queries:
        t0 = time.perf_counter()
        res = store.query("bench", q)
        times.append((time.perf_counter() - t0) * 1000)
        tops.append([c.id for c in res[:10]])
    times.sort()
    return {"p50_ms": round(statistics.median(times), 3), "p95_ms": round(times[int(0.95 * (len(times) - 1))], 3)}, tops


def agreement(a: list[list[str]], b: list[list[str]]) -> float:
    return round(float(np.mean([len(set(x) & set(y)) / max(1, len(y)) for x, y in zip(a, b)])), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--batch-sizes", default="64,256,512,2048")
    parser.add_argument("--skip-local-mode-above", type=int, default=100_000)
    args = parser.parse_args()
    from qdrant_client import QdrantClient

    work = Path(tempfile.mkdtemp(prefix="bench-index-"))
    results: dict[str, Any] = {"sizes": {}}
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        # Batch size sweep at the smallest size: what sets index_batch_size.
        dense, sparse, ids = make_points(sizes[0])
        sweep = {}
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            sweep[b] = load(EdgeStore(work / f"sweep-{b}", hnsw_min_points=10**12), dense, sparse, ids, b)
        results["edge_batch_sweep"] = {b: r["points_per_s"] for b, r in sweep.items()}
        for n in sizes:
            dense, sparse, ids = make_points(n)
            qdense, qsparse, _ = make_points(args.queries, seed=1)
            queries = [HybridQuery(dense=qdense[i], sparse={SPARSE: qsparse[i]}, fusion="rrf", k=60,
                                   prefetch_limit=100, limit=10) for i in range(args.queries)]
            row: dict[str, Any] = {}
            exact = EdgeStore(work / f"edge-exact-{n}", hnsw_min_points=10**12)
            row["edge_exact_load"] = load(exact, dense, sparse, ids, 512)
            row["edge_exact_query"], edge_tops = query_latency(exact, queries)
            hnsw = EdgeStore(work / f"edge-hnsw-{n}", hnsw_min_points=1)
            row["edge_hnsw_load"] = load(hnsw, dense, sparse, ids, 512)
            row["edge_hnsw_query"], hnsw_tops = query_latency(hnsw, queries)
            row["hnsw_vs_exact_top10_agreement"] = agreement(hnsw_tops, edge_tops)
            if n <= args.skip_local_mode_above:
                local = open_store(work, client=QdrantClient(path=str(work / f"local-{n}")))
                row["local_mode_load"] = load(local, dense, sparse, ids, 256)
                row["local_mode_query"], local_tops = query_latency(local, queries[: min(30, len(queries))])
                row["edge_vs_local_top10_agreement"] = agreement(edge_tops[: len(local_tops)], local_tops)
                row["upsert_speedup_edge_over_local"] = round(
                    row["edge_exact_load"]["points_per_s"] / row["local_mode_load"]["points_per_s"], 1)
                row["query_speedup_edge_over_local"] = round(
                    row["local_mode_query"]["p50_ms"] / row["edge_exact_query"]["p50_ms"], 1)
                local.close()
            exact.close()
            hnsw.close()
            results["sizes"][str(n)] = row
            print(f"{n}: {row}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["command"] = "python bench/index.py --sizes " + args.sizes
    write_result("index", results)


if __name__ == "__main__":
    main()
