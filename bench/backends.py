"""Dense backends: sentence-transformers on PyTorch vs ONNX Runtime (fp32 and dynamic int8).

Same model (the packaged all-MiniLM-L6-v2), same SciFact abstracts, interleaved
in one process. Reports each ONNX variant's throughput ratio against PyTorch and
its cosine agreement (per-vector cosine between the two backends' embeddings),
plus the one-off export time. A backend is recommended only if it is faster and
agrees to cosine >= 0.999.

Usage: python bench/backends.py [--docs 1000] [--rounds 3]   (needs `pip install -e .[onnx]`)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import interleaved, scifact_docs, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    import numpy as np

    from embedder.batching import BatchPlan
    from embedder.models.dense import DenseEncoder, embed_dense
    from embedder.models.onnx_dense import OnnxDenseEncoder
    from embedder.models.registry import resolve_model

    texts = [t for _, t in scifact_docs(args.docs)]
    resolved = resolve_model("all-minilm-l6-v2", "dense")
    torch_enc = DenseEncoder(resolved, "cpu")
    torch_enc.load()
    reference = embed_dense(texts, torch_enc, batch=BatchPlan(args.batch)).vectors
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        for backend in ("onnx", "onnx-int8"):
            enc = OnnxDenseEncoder(resolved, Path(cache), backend)
            t0 = time.perf_counter()
            enc.load()
            export_s = time.perf_counter() - t0
            vectors = embed_dense(texts, enc, batch=BatchPlan(args.batch)).vectors
            cos = np.sum(vectors * reference, axis=1)
            timing = interleaved(lambda: embed_dense(texts, torch_enc, batch=BatchPlan(args.batch)),
                                 lambda e=enc: embed_dense(texts, e, batch=BatchPlan(args.batch)),
                                 len(texts), args.rounds)
            agree = float(cos.min())
            results[backend] = {
                "torch_items_per_s": timing["raw_items_per_s"], "onnx_items_per_s": timing["pipeline_items_per_s"],
                "throughput_ratio_vs_torch": timing["ratio"], "cosine_mean": round(float(cos.mean()), 6),
                "cosine_min": round(agree, 6), "export_and_load_s": round(export_s, 1),
                "recommended": bool(timing["ratio"] > 1.0 and agree >= 0.999),
            }
    write_result("backends", {"docs": len(texts), "model": "all-minilm-l6-v2", "backends": results})


if __name__ == "__main__":
    main()
