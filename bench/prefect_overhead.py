"""Prefect's own overhead on the sample collection: embedded (ephemeral) server vs a running server.

For each mode, runs `embed-collections run` on the sample collection (rerank
disabled: no trained cross-encoder ships offline) a few times in fresh
processes and reports:
- process_wall_s: the whole command (imports, server start, flow, exit);
- flow_s: the collection subflow's own latency (summary.performance_baseline);
- stage_compute_s: the sum of the stages' measured compute;
- orchestration_s = flow_s - stage_compute_s (task runs, caching, artifacts, events);
- startup_s = process_wall_s - flow_s (imports, temporary server, teardown).

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
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, check=True, timeout=600)
    wall = time.perf_counter() - t0
    s = json.loads((out / name / "processing_summary.json").read_text())
    flow = s["performance_baseline"]["latency_seconds"]
    compute = sum(v["latency_ms"] for v in s["telemetry"]["stages"].values()) / 1000
    return {"process_wall_s": wall, "flow_s": flow, "stage_compute_s": compute,
            "orchestration_s": flow - compute, "startup_s": wall - flow}


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
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
    write_result("prefect_overhead", {"repeats": args.repeats, "modes": result})


if __name__ == "__main__":
    main()
