"""Prefect's own overhead on the sample collection: embedded (ephemeral) server vs a running server.

For each mode, runs `embed-collections run` on the sample collection (rerank
disabled: no trained cross-encoder ships offline; sparse after dense, so task
runs do not overlap) a few times in fresh processes, then reads the collection
subflow's run and its task runs back from that mode's Prefect API, and reports:
- orchestration_s = the subflow run's duration - the sum of its task runs'
  durations (what Prefect costs between and around the stages);
- subflow_run_s and tasks_s, its two terms;
- process_wall_s: the whole command (imports, server start, flow, exit);
- startup_s = process_wall_s - the parent flow run's duration (imports,
  temporary server start and teardown: what a running server saves);
- stage_compute_s: the stages' own measured compute (the summary's telemetry),
  so tasks_s - stage_compute_s is what the task runs add around it (model loads,
  stage files, leases).

Usage: python bench/prefect_overhead.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, start_prefect_server, write_result  # noqa: E402


def _one(env: dict[str, str], out: Path, name: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "flows.cli", "run", "--input", str(REPO / "examples/sample_collection"),
           "--collection", name, "--queries", str(REPO / "examples/queries.jsonl"), "--output-dir", str(out),
           "--disable-rerank", "--local-files-only"]
    env = {**env, "EMBEDDER_OVERLAP_SPARSE": "false"}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, check=True, timeout=600)
    wall = time.perf_counter() - t0
    s = json.loads((out / name / "processing_summary.json").read_text())
    compute = sum(v["latency_ms"] for v in s["telemetry"]["stages"].values()) / 1000
    # The runs are read in another process with the same environment: for the embedded mode that
    # starts a temporary server over the same database, as the CLI did.
    read = subprocess.run([sys.executable, __file__, "--read-runs", name], cwd=REPO, env=env,
                          capture_output=True, text=True, check=True, timeout=600)
    runs = json.loads(read.stdout.strip().splitlines()[-1])
    return {"orchestration_s": runs["subflow_run_s"] - runs["tasks_s"], **runs, "process_wall_s": wall,
            "startup_s": wall - runs["parent_run_s"], "stage_compute_s": compute}


def read_runs(name: str) -> dict[str, float]:
    """Durations of the latest run of the collection's subflow, its task runs and its parent flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        def latest(flow_run_name: str):
            return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])),
                                         sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)[0]

        subflow = latest(f"embed-collection-{name}")
        # The CLI runs each collection as a subflow of the run's parent flow (collection_fanout=auto).
        parent = client.read_flow_run(client.read_task_run(subflow.parent_task_run_id).flow_run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[subflow.id])),
                                      limit=200)
    return {"subflow_run_s": subflow.total_run_time.total_seconds(),
            "tasks_s": sum(t.total_run_time.total_seconds() for t in tasks), "task_runs": len(tasks),
            "parent_run_s": parent.total_run_time.total_seconds()}


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--read-runs", metavar="COLLECTION", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read_runs:
        print(json.dumps(read_runs(args.read_runs)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    base = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    base.pop("PREFECT_API_URL", None)
    result = {}
    # Distinct output dirs per repeat: every run computes every stage (no cache hits).
    embedded_env = {**base, "PREFECT_HOME": str(tmp / "embedded-home")}
    _one(embedded_env, tmp / "warm", "warmup")  # the first run pays the database migrations
    result["embedded"] = _median([_one(embedded_env, tmp / f"e{i}", "sample") for i in range(args.repeats)])
    server, api = start_prefect_server(tmp / "server-home", 4300 + os.getpid() % 500)
    try:
        server_env = {**base, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp / "client-home")}
        result["running_server"] = _median([_one(server_env, tmp / f"s{i}", "sample") for i in range(args.repeats)])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    write_result("prefect_overhead", {"command": f"python bench/prefect_overhead.py --repeats {args.repeats}",
                                      "repeats": args.repeats, "modes": result})


if __name__ == "__main__":
    main()
