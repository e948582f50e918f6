"""Failures tell the truth: late inputs caught by preflight, a fresh summary from every run, exit codes.

Each test is a sequence of real runs (the CLI in a subprocess where the exit code is the point, the flow
in-process otherwise) and asserts on what they leave behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedder.errors import CollectionsFailedError
from embedder.summary import load_summary
from tests.conftest import REPO, SAMPLE_DIR, SAMPLE_QRELS, SAMPLE_QUERIES
from tests.helpers.homes import cli_env

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _run(cfg):
    from flows.embed_collections import embed_collections

    return embed_collections(cfg)


@pytest.mark.parametrize("broken", ["qrels", "queries", "missing-qrels"])
def test_a_bad_queries_or_qrels_file_fails_in_seconds_and_replaces_the_summary(sample_config, tmp_path, broken):
    first = _run(sample_config)[0]
    assert first.status in ("completed", "partial")
    out = Path(sample_config.output_dir) / "sample"
    kept = {n: (out / n).read_bytes() for n in ("dense.parquet", "qdrant.jsonl", "index.json")}
    queries, qrels = tmp_path / "queries.jsonl", tmp_path / "qrels.tsv"
    shutil.copy(SAMPLE_QUERIES, queries)
    shutil.copy(SAMPLE_QRELS, qrels)
    if broken == "qrels":
        with open(qrels, "a") as fh:
            fh.write("q1\tsourdough-0000\tvery\n")
        where = f"{qrels}:{len(qrels.read_text().splitlines())}"
    elif broken == "queries":
        with open(queries, "a") as fh:
            fh.write('{"_id": "q99", "text": \n')
        where = f"{queries}:{len(queries.read_text().splitlines())}"
    else:
        qrels.unlink()
        where = str(qrels)
    t0 = time.perf_counter()
    with pytest.raises(CollectionsFailedError) as failed:
        _run(sample_config.model_copy(update={"queries_path": str(queries), "qrels_path": str(qrels)}))
    elapsed = time.perf_counter() - t0
    [s] = failed.value.summaries
    assert s.status == "failed" and s.failed_stage == "preflight" and where in s.warnings[0], s.warnings
    assert elapsed < first.performance_baseline.latency_seconds + 10  # no stage ran: seconds, not a whole run
    assert s.dense_run is None and s.telemetry.lease_events == []  # no GPU work at all
    # A fresh summary replaced the old one; beside it, the last good run's exports and index, named as such.
    current = load_summary(out / "processing_summary.json")
    assert current.run_id == s.run_id != first.run_id and current.exports_run_id == first.run_id
    assert {n: (out / n).read_bytes() for n in kept} == kept


def test_a_collection_without_valid_chunks_fails_alone_and_the_run_exits_non_zero(tmp_path):
    src = tmp_path / "in"
    for name, files in {"alpha": ["bicycles_chunks.json", "chess_chunks.json"], "beta": ["coffee_chunks.json"]}.items():
        (src / name).mkdir(parents=True)
        for f in files:
            shutil.copy(SAMPLE_DIR / f, src / name / f)
    (src / "gamma").mkdir()
    (src / "gamma" / "notes_chunks.json").write_text("this is not JSON {")
    env = cli_env(tmp_path / "home")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--input", str(src), "--output-dir", str(out),
                        "--local-files-only", "--disable-rerank"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "collection 'gamma' failed in load" in r.stderr and "Traceback" not in r.stderr
    # Not a terminal: each long stage logs its progress as a line (a terminal gets a bar instead).
    assert all(f"alpha {stage}: 10/10 (100%)" in r.stderr for stage in ("dense", "sparse", "index")), r.stderr
    statuses = {c: load_summary(out / c / "processing_summary.json") for c in ("alpha", "beta", "gamma")}
    assert statuses["alpha"].status == statuses["beta"].status == "completed"
    assert statuses["alpha"].chunk_count == 10 and statuses["beta"].chunk_count == 5
    gamma = statuses["gamma"]
    assert gamma.status == "failed" and gamma.chunk_count == 0 and gamma.failed_stage == "load"
    assert gamma.rejects.count == 1
    [reject] = [json.loads(line) for line in (out / "gamma" / "rejects.jsonl").read_text().splitlines()]
    assert "notes_chunks.json" in reject["source"]
    # Where the run's fixed cost went, as the summary and the CLI's "Time:" line say it: the temporary server
    # was started (and timed) before the flow, each model load is its stage's.
    startup = statuses["alpha"].telemetry.startup
    assert startup is not None and startup.imports_s is not None
    assert startup.server_start_s and startup.flow_s and startup.process_to_flow_s >= startup.server_start_s
    loads = [statuses[c].telemetry.stages["dense"]["model_load_s"] for c in ("alpha", "beta")]
    assert max(loads) > 0 and min(loads) >= 0  # one process: the first collection loads, the second reuses
    assert "Prefect server start" in r.stdout and "model loads: dense" in r.stdout
    # The same run again: completed and partial collections exit 0, so only gamma keeps it at 1.
    shutil.rmtree(src / "gamma")
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--input", str(src), "--output-dir", str(out),
                        "--local-files-only", "--disable-rerank"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # Served from cache, nothing was loaded: the line says what this run spent, not what the first did.
    assert "Time: process start to flow" in r.stdout and "model loads" not in r.stdout, r.stdout


def test_the_prefect_flow_run_ends_failed_while_the_other_collections_ran(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from embedder.settings import CollectionInput, RunConfig

    bad = tmp_path / "empty.jsonl"
    bad.write_text('{"id": "x", "text": ""}\n')  # one record, rejected: no valid chunk
    cfg = RunConfig(collections=[CollectionInput(name="empty", path=str(bad)),
                                 CollectionInput(name="good", path=str(SAMPLE_DIR))],
                    output_dir=str(tmp_path / "out"), local_files_only=True, rerank={"enabled": False})
    from flows.embed_collections import embed_collections

    state = embed_collections(cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(CollectionsFailedError) as failed:
        state.result()
    assert [s.status for s in failed.value.summaries] == ["failed", "completed"]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=["embed-collection-empty", "embed-collection-good"])))
    latest = {}
    for run in sorted(runs, key=lambda r: r.expected_start_time):
        latest[run.name] = run.state.type.value
    assert latest == {"embed-collection-empty": "FAILED", "embed-collection-good": "COMPLETED"}
