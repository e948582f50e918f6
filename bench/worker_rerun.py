"""The nightly re-run through a worker: what a deployment run of an unchanged collection costs, and where.

Starts `prefect server start`, sets up the pool and the GPU limit (`deployments/setup.py`), registers the
deployments (`prefect deploy --all`) and starts one worker, as docs/prefect.md says. Then, for each
fan-out (``auto``, the default: one collection runs in the parent's process; ``deployments``: it is a
flow run of the `collection` deployment, which the worker starts in a process of its own), it runs the `manual`
deployment on N SciFact abstracts: a first run, then R unchanged re-runs, the two fan-outs interleaved.

For each run it reports, from the server's own records:
- ``flow_run_s``: the parent flow run's start to end (the duration the UI shows);
- ``child_run_s``: the collection's own flow run (subflow or child run);
- ``submit_to_end_s``: from the API call that created the run to its end (the worker's poll, the
  process start and the imports included: what a scheduled run costs the machine);
- ``embedded``: embeddings the run computed (0 on an unchanged re-run).

Usage: python bench/worker_rerun.py [--docs 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, scifact_docs, start_prefect_server, write_result  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(client: Any, deployment_id: Any, config: dict[str, Any]) -> dict[str, float]:
    """One run of the deployment, to its end; its timings from the server."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    t0 = time.time()
    run = client.create_flow_run_from_deployment(deployment_id, parameters={"config": config})
    while True:
        run = client.read_flow_run(run.id)
        if run.state is not None and run.state.is_final():
            break
        time.sleep(0.5)
    if not run.state.is_completed():
        raise SystemExit(f"run {run.id} ended {run.state.name}: {run.state.message}")
    ended = time.time()
    children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
    child = max(children, key=lambda r: r.total_run_time) if children else None
    summary = json.loads((Path(config["output_dir"]) / "docs" / "processing_summary.json").read_text())
    return {"flow_run_s": round((run.end_time - run.start_time).total_seconds(), 2),
            "child_run_s": round(child.total_run_time.total_seconds(), 2) if child is not None else None,
            "submit_to_end_s": round(ended - t0, 2),
            "embedded": summary["dense_run"]["total_embeddings_generated"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2, help="unchanged re-runs per fan-out")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    src = tmp / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in scifact_docs(args.docs)))
    server, api = start_prefect_server(tmp / "server-home", _port())
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp / "client-home"),
           "EMBEDDER_PROJECT_DIR": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    worker = None
    try:
        for cmd in ([sys.executable, "deployments/setup.py"],
                    [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]):
            subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
        log = open(tmp / "worker.log", "w")
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "embedding"],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        os.environ["PREFECT_API_URL"] = api
        from prefect.client.orchestration import SyncPrefectClient

        results: dict[str, dict[str, Any]] = {}
        with SyncPrefectClient(api) as client:
            manual = client.read_deployment_by_name("embed-collections/manual")
            configs = {fanout: {"collections": [{"name": "docs", "path": str(src)}], "output_dir": str(tmp / fanout),
                                "local_files_only": True, "rerank": {"enabled": False},
                                "orchestration": {"collection_fanout": fanout}}
                       for fanout in ("auto", "deployments")}
            for fanout, config in configs.items():
                results[fanout] = {"first": _run(client, manual.id, config), "unchanged": []}
            for r in range(args.rounds):
                for fanout in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
                    results[fanout]["unchanged"].append(_run(client, manual.id, configs[fanout]))
    finally:
        for proc in (worker, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)

    for fanout, res in results.items():
        unchanged = res["unchanged"]
        res["unchanged_median"] = {key: statistics.median(u[key] for u in unchanged)
                                   for key in ("flow_run_s", "submit_to_end_s") if unchanged}
        print(f"{fanout:12s} first {res['first']['flow_run_s']:6.1f} s; unchanged flow run "
              f"{res['unchanged_median'].get('flow_run_s', float('nan')):5.1f} s, submit to end "
              f"{res['unchanged_median'].get('submit_to_end_s', float('nan')):5.1f} s")
    write_result("worker_rerun", {"docs": args.docs, "rounds": args.rounds, "results": results})


if __name__ == "__main__":
    main()
