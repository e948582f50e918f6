"""`embed-collections server start|status|stop`: a Prefect server kept warm between CLI runs, as users drive it.

Every step is the real CLI in a subprocess, with its own Prefect home: the
runs use the warm server (no temporary server, their flow runs on its API),
an unchanged re-run computes nothing and no request of either run was
retried, a server killed hard is noticed and a run falls back to a temporary server,
and `server stop` leaves no process behind. The warm runner started beside the
server runs each `run` in a fork of a process with Prefect imported and the
models loaded: same results as a run in its own process, Ctrl-C forwarded, a
caller killed hard takes its run with it, and a caller whose import-time
environment differs runs in its own process.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

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


def test_runs_use_the_warm_server_and_its_runner_and_fall_back_when_they_are_gone(tmp_path):
    home, out, alone = tmp_path / "home", tmp_path / "out", tmp_path / "alone"
    home.mkdir()
    assert _cli(home, "server", "status").returncode == 1  # none yet
    started = _cli(home, "server", "start")
    assert started.returncode == 0, started.stderr[-3000:]
    record = json.loads((home / "embedder-server.json").read_text())
    url, pid = record["url"], record["pid"]
    runner = json.loads((home / "embedder-runner.json").read_text())
    assert f"started: warm Prefect server at {url}" in started.stdout
    assert (f"warm runner started (pid {runner['pid']}; dense all-minilm-l6-v2: loaded; sparse qdrant-bm25: "
            "loaded)") in started.stdout, started.stdout
    again = _cli(home, "server", "start")  # idempotent: the running ones are named, not second ones started
    assert again.returncode == 0 and f"already running: warm Prefect server at {url}" in again.stdout
    assert f"warm runner already running (pid {runner['pid']})" in again.stdout
    try:
        status = _cli(home, "server", "status")
        assert status.returncode == 0 and url in status.stdout
        assert f"warm runner (pid {runner['pid']}) runs each `embed-collections run` from here" in status.stdout

        # A run through the runner, on the warm server: no temporary server, the dense model loaded before.
        first = _run(home, out)
        assert first.returncode == 0, first.stderr[-3000:]
        assert f"using the warm Prefect server at {url}" in first.stderr
        assert "Starting temporary server" not in first.stderr + first.stdout
        summary = load_summary(out / "sample" / "processing_summary.json")
        assert summary.status == "completed" and summary.telemetry.startup is not None
        assert summary.telemetry.startup.server_start_s is None  # no server was started for this run
        assert summary.telemetry.startup.warm_runner is True
        assert summary.dense_run.total_embeddings_generated > 0
        assert summary.telemetry.stages["dense"]["model_load_s"] == 0.0
        # The flow run lives on the warm server, as the UI would show it.
        runs = httpx.post(f"{url}/flow_runs/filter", json={"limit": 50}, timeout=30).json()
        assert any(r["name"] and r["state"]["type"] == "COMPLETED" for r in runs), runs

        # The same run in its own process (an import-time variable differs, so the runner is not used):
        # the same vectors.
        own = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--input", str(SAMPLE_DIR), "--collection",
                              "sample", "--output-dir", str(alone), "--local-files-only", "--disable-rerank"],
                             env=cli_env(home, PREFECT_LOGGING_LEVEL="INFO"), cwd=REPO, capture_output=True,
                             text=True, timeout=600)
        assert own.returncode == 0, own.stderr[-3000:]
        assert (f"not using the warm runner (pid {runner['pid']}): it was started with other values of "
                "PREFECT_LOGGING_LEVEL") in own.stderr
        assert not load_summary(alone / "sample" / "processing_summary.json").telemetry.startup.warm_runner
        a, b = _dense_vectors(out), _dense_vectors(alone)
        assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-5) for k in a)

        # The nightly case: an unchanged re-run on the warm server computes nothing, and no request of
        # these runs had to be retried (a SQLite write that lost a race used to cost a 503 and a 2 s wait;
        # the server logs every retryable error).
        rerun = _run(home, out)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        summary = load_summary(out / "sample" / "processing_summary.json")
        assert summary.status == "completed" and summary.dense_run.total_embeddings_generated == 0
        server_log = (home / "embedder-server.log").read_text(encoding="utf-8", errors="replace")
        assert "retryable exception" not in server_log, server_log[-3000:]

        # A bad argument: the runner's child reports it on the caller's stderr, with the CLI's exit status.
        bad = _cli(home, "run", "--input", str(tmp_path / "missing.jsonl"), "--output-dir", str(out))
        assert bad.returncode == 2 and "does not exist" in bad.stderr, bad.stderr[-2000:]

        # Ctrl-C reaches the run: held at the collection's lock (taken by this test), it stops and the
        # caller exits as a shell reports SIGINT.
        lock = os.open(out / "sample" / ".writer.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(lock, fcntl.LOCK_EX)
        args = [sys.executable, "-m", "flows.cli", "run", "--input", str(SAMPLE_DIR), "--collection", "sample",
                "--output-dir", str(out), "--local-files-only", "--disable-rerank"]
        proc = subprocess.Popen(args, env=cli_env(home), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        _wait_running(url, proc)
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
        assert "SIGINT: stopping after the current batch" in stderr

        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)

        # Killed hard as soon as the runner forked its run: the run dies with it, and the runner serves the
        # next run. (Had the run taken its collection's lease before the kill, the warm server frees it at
        # the lease's expiry, as for any run killed on a running server: the shortest lease bounds the wait.)
        killed = tmp_path / "killed"  # a first run into it: seconds of work, so the kill lands mid-run
        args = [*args[:args.index("--output-dir") + 1], str(killed), *args[args.index("--output-dir") + 2:]]
        proc = subprocess.Popen(args, env=cli_env(home, EMBEDDER_GPU_LEASE_DURATION_S="60"), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 120
        while not _children(runner["pid"]) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before the runner forked it"
            time.sleep(0.05)
        assert len(_children(runner["pid"])) == 1
        proc.kill()
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while _children(runner["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _children(runner["pid"]), "the run outlived its killed caller"
        after_kill = _run(home, killed)
        assert after_kill.returncode == 0, after_kill.stderr[-3000:]
        summary = load_summary(killed / "sample" / "processing_summary.json")
        assert summary.status == "completed" and summary.telemetry.startup.warm_runner is True
        healed = _dense_vectors(killed)  # what the killed run left behind did not change a vector
        assert healed.keys() == a.keys() and all(np.allclose(healed[k], a[k], atol=1e-5) for k in a)

        # The server killed hard (a reboot, the OOM killer): its runner stops by itself, and the next run
        # notices and starts a temporary server.
        os.killpg(pid, signal.SIGKILL)
        assert process_group_gone(pid, wait_s=30)
        assert process_group_gone(runner["pid"], wait_s=60), "the runner outlived its server"
        after = _run(home, out)
        assert after.returncode == 0, after.stderr[-3000:]
        assert "using the warm Prefect server" not in after.stderr
        summary = load_summary(out / "sample" / "processing_summary.json")
        assert summary.status == "completed" and summary.telemetry.startup.server_start_s
        assert not summary.telemetry.startup.warm_runner
        gone = _cli(home, "server", "status")
        assert gone.returncode == 1 and "is gone; its record was removed" in gone.stdout
        assert not (home / "embedder-server.json").exists() and not (home / "embedder-runner.json").exists()

        # Started again and stopped: the whole process groups go, and the records with them.
        restarted = _cli(home, "server", "start")
        assert restarted.returncode == 0, restarted.stderr[-3000:]
        pid = json.loads((home / "embedder-server.json").read_text())["pid"]
        runner_pid = json.loads((home / "embedder-runner.json").read_text())["pid"]
        stopped = _cli(home, "server", "stop")
        assert stopped.returncode == 0 and f"stopped the warm runner (pid {runner_pid})" in stopped.stdout
        assert process_group_gone(pid, wait_s=30) and not (home / "embedder-server.json").exists()
        assert process_group_gone(runner_pid, wait_s=30) and not (home / "embedder-runner.json").exists()
    finally:
        _kill_recorded(home)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_recorded(home: Path) -> None:
    for name in ("embedder-runner.json", "embedder-server.json"):
        try:
            os.killpg(json.loads((home / name).read_text())["pid"], signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass


def _dense_vectors(out: Path) -> dict[str, np.ndarray]:
    rows = [json.loads(line) for line in (out / "sample" / "qdrant.jsonl").read_text().splitlines()]
    return {r["id"]: np.asarray(r["vector"]["dense"], dtype=np.float32) for r in rows}


def _wait_running(url: str, proc: subprocess.Popen[str], timeout_s: float = 300) -> None:
    """Until the warm server shows a flow run of ``proc`` running (its signal handlers are then installed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was running"
        runs = httpx.post(f"{url}/flow_runs/filter", json={"limit": 50}, timeout=30).json()
        if any(r["state"]["type"] == "RUNNING" for r in runs):
            return
        time.sleep(0.5)
    raise AssertionError("no flow run reached RUNNING")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        return []
