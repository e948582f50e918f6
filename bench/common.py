"""Helpers shared by the benchmarks: SciFact loading, timing, JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCIFACT = REPO.parent / "shared" / "datasets" / "scifact"
RESULTS = REPO / "bench" / "results"


def scifact_docs(limit: int | None = None) -> list[tuple[str, str]]:
    """(id, title + " " + text) pairs from the shared SciFact corpus."""
    out = []
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            out.append((str(rec["_id"]), f"{rec.get('title', '')} {rec.get('text', '')}".strip()))
            if limit and len(out) >= limit:
                break
    return out


def scifact_queries(limit: int | None = None) -> list[tuple[str, str]]:
    """(id, text) pairs from the shared SciFact queries."""
    out = []
    with open(SCIFACT / "queries.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            out.append((str(rec["_id"]), rec["text"]))
            if limit and len(out) >= limit:
                break
    return out


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(raw: Callable[[], Any], pipeline: Callable[[], Any], items: int, rounds: int) -> dict[str, float]:
    """Alternate raw and pipeline calls; report median throughputs and their ratio."""
    raw_t, pipe_t = [], []
    for r in range(rounds):
        # Alternate which goes first so warm caches and thermal drift favour neither.
        order = [(raw, raw_t), (pipeline, pipe_t)] if r % 2 == 0 else [(pipeline, pipe_t), (raw, raw_t)]
        for fn, sink in order:
            sink.append(timed(fn))
    raw_ips = items / statistics.median(raw_t)
    pipe_ips = items / statistics.median(pipe_t)
    return {"items": items, "rounds": rounds, "raw_items_per_s": round(raw_ips, 2),
            "pipeline_items_per_s": round(pipe_ips, 2), "ratio": round(pipe_ips / raw_ips, 4),
            "raw_seconds": [round(t, 3) for t in raw_t], "pipeline_seconds": [round(t, 3) for t in pipe_t]}


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Print the JSON and write it to bench/results/<name>.json."""
    data = {"benchmark": name, "measured_at": datetime.now(UTC).isoformat(),
            "machine": {"python": platform.python_version(), "processor": platform.machine(),
                        "cpus": __import__("os").cpu_count()}, **data}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2))
    return path


def start_prefect_server(home: Path, port: int, *, ui: bool = False, extra_env: dict[str, str] | None = None):
    """Start `prefect server start` on loopback and wait until healthy; returns (process, api_url)."""
    import os
    import subprocess
    import sys

    import httpx

    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           **(extra_env or {})}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd + ([] if ui else ["--no-ui"]), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return proc, api
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("prefect server did not become healthy in 120 s")
