"""`embed-collections server start|status|stop`: a Prefect server kept warm between CLI runs, as users drive it.

Every step is the real CLI in a subprocess, with its own Prefect home: the
runs use the warm server (no temporary server, their flow runs on its API),
an unchanged re-run computes nothing and no request of either run was
retried, a server killed hard is noticed and a run falls back to a temporary server,
and `server stop` leaves no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from embedder.summary import load_summary
from tests.conftest import REPO, SAMPLE_DIR, process_group_gone
from tests.helpers.homes import cli_env


def _cli(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = cli_env(home)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _run(home: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return _cli(home, "run", "--input", str(SAMPLE_DIR), "--collection", "sample", "--output-dir", str(out),
                "--local-files-only", "--disable-rerank")


def test_runs_use_the_warm_server_and_fall_back_when_it_is_gone(tmp_path):
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    assert _cli(home, "server", "status").returncode == 1  # none yet
    started = _cli(home, "server", "start")
    assert started.returncode == 0, started.stderr[-3000:]
    record = json.loads((home / "embedder-server.json").read_text())
    url, pid = record["url"], record["pid"]
    assert f"started: warm Prefect server at {url}" in started.stdout
    again = _cli(home, "server", "start")  # idempotent: the running one is named, not a second started
    assert again.returncode == 0 and f"already running: warm Prefect server at {url}" in again.stdout
    try:
        status = _cli(home, "server", "status")
        assert status.returncode == 0 and url in status.stdout

        first = _run(home, out)
        assert first.returncode == 0, first.stderr[-3000:]
        assert f"using the warm Prefect server at {url}" in first.stderr
        assert "Starting temporary server" not in first.stderr + first.stdout
        summary = load_summary(out / "sample" / "processing_summary.json")
        assert summary.status == "completed" and summary.telemetry.startup is not None
        assert summary.telemetry.startup.server_start_s is None  # no server was started for this run
        # The flow run lives on the warm server, as the UI would show it.
        runs = httpx.post(f"{url}/flow_runs/filter", json={"limit": 50}, timeout=30).json()
        assert any(r["name"] and r["state"]["type"] == "COMPLETED" for r in runs), runs

        # The nightly case: an unchanged re-run on the warm server computes nothing, and no request of
        # either run had to be retried (a SQLite write that lost a race used to cost a 503 and a 2 s wait;
        # the server logs every retryable error).
        rerun = _run(home, out)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        summary = load_summary(out / "sample" / "processing_summary.json")
        assert summary.status == "completed" and summary.dense_run.total_embeddings_generated == 0
        server_log = (home / "embedder-server.log").read_text(encoding="utf-8", errors="replace")
        assert "retryable exception" not in server_log, server_log[-3000:]

        # Killed hard (a reboot, the OOM killer): the next run notices and starts a temporary server.
        os.killpg(pid, signal.SIGKILL)
        assert process_group_gone(pid, wait_s=30)
        after = _run(home, out)
        assert after.returncode == 0, after.stderr[-3000:]
        assert "using the warm Prefect server" not in after.stderr
        summary = load_summary(out / "sample" / "processing_summary.json")
        assert summary.status == "completed" and summary.telemetry.startup.server_start_s
        gone = _cli(home, "server", "status")
        assert gone.returncode == 1 and "is gone; its record was removed" in gone.stdout
        assert not (home / "embedder-server.json").exists()

        # Started again and stopped: the whole process group goes, and the record with it.
        restarted = _cli(home, "server", "start")
        assert restarted.returncode == 0, restarted.stderr[-3000:]
        pid = json.loads((home / "embedder-server.json").read_text())["pid"]
        stopped = _cli(home, "server", "stop")
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        assert process_group_gone(pid, wait_s=30) and not (home / "embedder-server.json").exists()
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
