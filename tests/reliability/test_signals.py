"""Stopping the CLI from outside, with real signals, as a user or a service manager does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SCIFACT, process_group_gone
from tests.helpers.homes import cli_env
from tests.helpers.wrapped_cli import cli_with_dense_hook

pytestmark = pytest.mark.slow


# Four dense batches of 16: the signal lands in the third, a fourth remains. What is asserted needs
# batches, not their size.
N_DOCS = 64
BATCH = {"EMBEDDER_CPU_BATCH_ITEMS": "16"}

# The real CLI, on a device made slow (an injected fault): each dense batch waits a second before its
# forward pass and says so, so the signal lands mid-stage, after a known batch, on any hardware.
SLOW_DENSE = cli_with_dense_hook("""
    print(f"DENSE BATCH {calls[0]}", flush=True)
    time.sleep(1.0)
""")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SciFact abstracts as chunks: several dense batches."""
    path = tmp_path_factory.mktemp("signals") / "docs.jsonl"
    with open(SCIFACT / "corpus.jsonl") as src, open(path, "w") as dst:
        for i, line in enumerate(src):
            if i == N_DOCS:
                break
            doc = json.loads(line)
            dst.write(json.dumps({"id": doc["_id"], "text": f"{doc['title']}. {doc['text']}"}) + "\n")
    return path


def _start(args: list[str], home: Path, log: Path, slow: bool = True, **env: str) -> subprocess.Popen:
    environ = cli_env(home, **BATCH, **env)
    cmd = ["-c", SLOW_DENSE] if slow else ["-m", "flows.cli"]
    with open(log, "w") as out:
        # Its own session: the test can tell afterwards whether any process of the run (the temporary
        # Prefect server included) outlived it.
        return subprocess.Popen([sys.executable, *cmd, *args], cwd=REPO, env=environ, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert proc.poll() is None, f"the run ended before {text!r}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout_s:.0f} s: {log.read_text()[-3000:]}"
        time.sleep(0.2)


def _cleanup(proc: subprocess.Popen) -> None:
    if not process_group_gone(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)


def test_sigterm_mid_dense_publishes_a_cancelled_summary_and_the_rerun_keeps_its_vectors(corpus, tmp_path):
    home, out, log = tmp_path / "home", tmp_path / "out", tmp_path / "run.log"
    args = ["run", "--input", str(corpus), "--collection", "sig", "--output-dir", str(out), "--local-files-only",
            "--disable-rerank"]
    proc = _start(args, home, log)
    try:
        _wait_for(log, "DENSE BATCH 3", proc)  # two batches done, the third under way
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        stop_s = time.monotonic() - t0
        text = log.read_text()
        assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
        # Between two layers of the model, then the run's own unwinding and the server's stop.
        print(f"SIGTERM to exit: {stop_s:.1f} s")
        assert stop_s < 60, text[-3000:]
        assert "DENSE BATCH 4" not in text, "the stop waited for another batch"
        assert process_group_gone(proc.pid, wait_s=10), "a process of the run outlived it (the temporary server?)"
        assert "Traceback" not in text
        summary = json.loads((out / "sig" / "processing_summary.json").read_text())
        assert summary["status"] == "cancelled" and summary["failed_stage"] == "dense"
        assert summary["warnings"][0].startswith("run stopped by SIGTERM during dense")
        assert not list((out / "sig").glob("*.parquet")), "a stopped run published exports"
    finally:
        _cleanup(proc)

    # The GPU slot and the collection were released, and the re-run embeds only what the stop left.
    rerun = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                           timeout=900, env=cli_env(home, **BATCH))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = json.loads((out / "sig" / "processing_summary.json").read_text())
    dense = summary["dense_run"]
    assert summary["status"] == "completed" and summary["chunk_count"] == N_DOCS, summary["warnings"]
    # The two finished batches were stored by the stopped run: only the rest is embedded again.
    assert dense["reused"] > 0 and dense["total_embeddings_generated"] + dense["reused"] == N_DOCS, dense
    assert not [w for w in summary["warnings"] if "lease" in w and "released" in w], summary["warnings"]


def test_second_ctrl_c_stops_at_once_and_leaves_no_process(corpus, tmp_path):
    home, out, log = tmp_path / "home", tmp_path / "out", tmp_path / "run.log"
    proc = _start(["run", "--input", str(corpus), "--collection", "sig2", "--output-dir", str(out),
                   "--local-files-only", "--disable-rerank"], home, log)
    try:
        _wait_for(log, "DENSE BATCH 2", proc)
        proc.send_signal(signal.SIGINT)
        _wait_for(log, "again to stop at once", proc, timeout_s=60)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        assert proc.returncode == 128 + signal.SIGINT, log.read_text()[-3000:]
        # The killed server's exit is asynchronous.
        assert process_group_gone(proc.pid, wait_s=30), "a process of the run outlived it (the temporary server?)"
    finally:
        _cleanup(proc)


def test_a_server_that_does_not_start_in_time_is_one_line_naming_the_fix(tmp_path):
    from tests.conftest import SAMPLE_DIR

    log = tmp_path / "run.log"
    # A fresh database cannot be migrated in one second: the start-up times out.
    proc = _start(["run", "--input", str(SAMPLE_DIR), "--output-dir", str(tmp_path / "out"), "--local-files-only"],
                  tmp_path / "home", log, slow=False, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    try:
        proc.wait(timeout=300)
        text = log.read_text()
        assert proc.returncode == 1, text[-3000:]
        assert "Traceback" not in text and "╭" not in text, text[-3000:]
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert errors == [
            "error: the temporary Prefect server did not start within 1 s; point PREFECT_API_URL at a running server "
            "(`prefect server start`, then PREFECT_API_URL=http://127.0.0.1:4200/api) or raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"], text[-3000:]
        assert process_group_gone(proc.pid, wait_s=30)
    finally:
        _cleanup(proc)
