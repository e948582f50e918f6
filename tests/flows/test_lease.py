"""The GPU lease: serialisation across processes on one server, and recovery from a dead holder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLE_QUERIES

pytestmark = pytest.mark.slow


def _synthetic_collection(path: Path, n: int) -> Path:
    words = ("river stone cloud engine garden forest rocket planet ocean violin candle bridge tiger winter castle "
             "meadow harbor lantern desert falcon copper island thunder marble").split()
    with open(path, "w") as fh:
        for i in range(n):
            text = " ".join(words[(i * 7 + j) % len(words)] for j in range(40)) + f" document {i}"
            fh.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    return path


def test_three_concurrent_runs_never_overlap_on_the_gpu(prefect_server, tmp_path, tiny_cross_encoder):
    data = _synthetic_collection(tmp_path / "synthetic.jsonl", 600)
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "client-home")}
    procs = []
    for name in ("a", "b", "c"):
        cmd = [sys.executable, "-m", "flows.cli", "run", "--input", str(data), "--collection", f"run_{name}",
               "--output-dir", str(tmp_path / name), "--queries", str(SAMPLE_QUERIES), "--rerank-model",
               str(tiny_cross_encoder), "--local-files-only"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    events = []
    for name in ("a", "b", "c"):
        summary = json.loads((tmp_path / name / f"run_{name}" / "processing_summary.json").read_text())
        assert summary["status"] == "completed" and summary["rerank_run"]["status"] == "executed"
        assert summary["chunk_count"] == 600 and summary["index_run"]["points_count"] == 600
        for e in summary["telemetry"]["lease_events"]:
            events.append((name, e["stage"], datetime.fromisoformat(e["acquired_at"]),
                           datetime.fromisoformat(e["released_at"]), e["wait_s"]))
    assert len(events) == 6  # dense and rerank in each run
    events.sort(key=lambda e: e[2])
    for prev, nxt in zip(events, events[1:]):
        assert prev[3] <= nxt[2], f"GPU stages overlap: {prev} and {nxt}"
    assert max(e[4] for e in events) > 0.5, f"no run waited for the slot: {events}"


HOLDER = """
import os, signal
from prefect import flow
from tasks.lease import gpu_lease

@flow
def hold():
    with gpu_lease("gpu", "dense", timeout_s=30, lease_duration_s=60):
        print("HELD", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

hold()
"""

NEXT = """
import json, time
from prefect import flow
from prefect.client.orchestration import get_client
from tasks.lease import gpu_lease

@flow
def next_run():
    with get_client(sync_client=True) as client:
        stuck = client.read_global_concurrency_limit_by_name("gpu").active_slots
    with gpu_lease("gpu", "dense", timeout_s=150, lease_duration_s=60) as ev:
        pass
    return {**ev, "stuck_slots": stuck, "acquired_epoch": time.time()}

print("RESULT " + json.dumps(next_run()), flush=True)
"""


def _embedded_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    env.pop("PREFECT_API_URL", None)
    return env


def test_embedded_server_recovers_a_dead_holders_slot_after_its_lease(tmp_path):
    """The embedded default never reclaims a SIGKILLed holder's slot by itself; our recovery does."""
    env = _embedded_env(tmp_path / "home")
    # start_new_session: the holder's temporary server child outlives a SIGKILL and must be reaped.
    # Output goes to a file: the orphaned server child would keep a pipe open for ever.
    log_path = tmp_path / "holder.log"
    with open(log_path, "w") as log:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        holder.wait(timeout=180)
        killed_at = time.time()
        out = log_path.read_text()
        assert holder.returncode == -signal.SIGKILL and "HELD" in out, out
        nxt = subprocess.run([sys.executable, "-c", NEXT], env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    finally:
        try:
            os.killpg(holder.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    line = next((ln for ln in nxt.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, nxt.stdout + nxt.stderr
    ev = json.loads(line[len("RESULT "):])
    assert ev["stuck_slots"] == 1  # the dead holder's slot really was stuck
    waited = ev["acquired_epoch"] - killed_at
    assert 55 <= waited < 150, waited  # freed after the 60 s lease, not never


def test_gpu_slots_command_creates_and_reports_the_limit(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flows.cli", "gpu-slots", "--limit-name", "gpu-cli", "--recover"],
                       env=_embedded_env(tmp_path / "home"), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "gpu-cli: 0/1 slot(s) in use; freed 0" in r.stdout
