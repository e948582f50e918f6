"""Batches by padded-token budget against batches by row count, on the CPU, on SciFact abstracts.

Same model, same texts, same engine (token-budget batching and overlapped
tokenisation, :mod:`embedder.models.engine`), only the cut differs: ``items``
cuts every ``cpu_batch_items`` rows; ``tokens`` fills each batch up to
``cpu_batch_items`` x the model's maximum length padded tokens (the same
worst-case memory). Rounds are interleaved. Reported: docs/s (dense) and
pairs/s (rerank, a real-size MiniLM cross-encoder with a fresh head) per
policy, their ratio, batches and padding. ``batch_policy="auto"`` takes the
faster one on the CPU (see ``plan_token_budget``).

Usage: python bench/batching.py [--docs 1000] [--pairs 600] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import scifact_docs, scifact_queries, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu-items", type=int, default=64)
    args = parser.parse_args()

    from bench.stages import build_minilm_cross_encoder
    from embedder.models.dense import DenseEncoder
    from embedder.models.engine import ModelShape, plan_token_budget
    from embedder.models.registry import resolve_model
    from embedder.models.rerank import RerankEncoder

    texts = [t for _, t in scifact_docs(args.docs)]
    queries = [q for _, q in scifact_queries(50)]
    pairs = [(queries[i % len(queries)], texts[(i * 7) % len(texts)]) for i in range(args.pairs)]
    dense = DenseEncoder(resolve_model("all-minilm-l6-v2", "dense"), "cpu")
    ce_dir = build_minilm_cross_encoder(Path(tempfile.mkdtemp(prefix="bench-batching-")) / "ce")
    rerank = RerankEncoder(resolve_model(str(ce_dir), "rerank"), "cpu", local_files_only=True)
    jobs = {"dense": (dense, texts, args.cpu_items), "rerank": (rerank, pairs, max(1, args.cpu_items // 2))}
    seconds: dict[str, dict[str, list[float]]] = {j: {"items": [], "tokens": []} for j in jobs}
    detail: dict[str, dict[str, dict[str, float]]] = {j: {} for j in jobs}
    for r in range(args.rounds + 1):  # round 0 warms the model and the allocator
        for job, (encoder, inputs, cpu_items) in jobs.items():
            policies = ["items", "tokens"] if r % 2 == 0 else ["tokens", "items"]
            for policy in policies:
                model = encoder.load()
                shape = ModelShape.of(model, max_length=int(model.max_seq_length))
                engine = encoder.engine(plan_token_budget(shape, "cpu", "fp32", 12.0, cpu_items=cpu_items,
                                                          policy=policy))
                windows = [inputs[i:i + 4096] for i in range(0, len(inputs), 4096)]
                t0 = time.perf_counter()
                for _w, _out in engine.map(windows, lambda w: w):
                    pass
                if r:
                    seconds[job][policy].append(time.perf_counter() - t0)
                detail[job][policy] = {"batches": engine.stats.batches,
                                       "padding_ratio": round(engine.stats.padding_ratio, 4),
                                       "tokenise_s": round(engine.stats.tokenise_s, 3)}
    report = {}
    for job, (_enc, inputs, _n) in jobs.items():
        med = {p: statistics.median(v) for p, v in seconds[job].items()}
        report[job] = {
            "inputs": len(inputs),
            **{f"{p}_per_s": round(len(inputs) / med[p], 2) for p in med},
            "tokens_over_items": round(med["items"] / med["tokens"], 4),
            "faster": "tokens" if med["tokens"] < med["items"] else "items",
            "detail": detail[job], "seconds": {p: [round(s, 3) for s in v] for p, v in seconds[job].items()},
        }
    write_result("batching", {
        "command": f"python bench/batching.py --docs {args.docs} --pairs {args.pairs} --rounds {args.rounds}",
        "device": "cpu", "cpu_batch_items": args.cpu_items, "jobs": report,
    })


if __name__ == "__main__":
    main()
