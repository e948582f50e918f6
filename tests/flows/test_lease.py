"""The GPU lease with real servers and real processes: never two holders, and dead holders' slots come back.

Holders are separate Python processes. On a running server (`prefect server start` on loopback) only
Prefect's lease repossession frees a dead holder's slot; on the ephemeral server our recovery releases
it by lease id once the holder's pid is gone.
"""

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
from tests.helpers.homes import cli_env

pytestmark = pytest.mark.slow

LEASE_S = 60  # the shortest lease Prefect accepts; renewed every 45 s


def _synthetic_collection(path: Path, n: int) -> Path:
    words = ("river stone cloud engine garden forest rocket planet ocean violin candle bridge tiger winter castle "
             "meadow harbor lantern desert falcon copper island thunder marble").split()
    with open(path, "w") as fh:
        for i in range(n):
            text = " ".join(words[(i * 7 + j) % len(words)] for j in range(40)) + f" document {i}"
            fh.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    return path


def _overlaps(intervals: list[tuple[str, float, float]]) -> list[tuple]:
    ordered = sorted(intervals, key=lambda i: i[1])
    return [(a, b) for a, b in zip(ordered, ordered[1:]) if a[2] > b[1]]


def test_three_concurrent_runs_with_three_homes_never_overlap_on_the_gpu(prefect_server, tmp_path,
                                                                         tiny_cross_encoder):
    """The README's setup: one loopback server, runs from shells whose PREFECT_HOMEs differ."""
    data = _synthetic_collection(tmp_path / "synthetic.jsonl", 400)
    procs = []
    for name in ("a", "b", "c"):
        env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / f"home-{name}")}
        cmd = [sys.executable, "-m", "flows.cli", "run", "--input", str(data), "--collection", f"run_{name}",
               "--output-dir", str(tmp_path / name), "--queries", str(SAMPLE_QUERIES), "--rerank-model",
               str(tiny_cross_encoder), "--local-files-only"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    intervals, waits = [], []
    for name in ("a", "b", "c"):
        summary = json.loads((tmp_path / name / f"run_{name}" / "processing_summary.json").read_text())
        assert summary["status"] == "completed" and summary["rerank_run"]["status"] == "executed", summary["warnings"]
        assert summary["chunk_count"] == 400 and summary["index_run"]["points_count"] == 400
        for e in summary["telemetry"]["lease_events"]:
            assert e["recovery"] == "prefect" and e["lease_id"]  # a running server repossesses, not us
            intervals.append((f"{name}:{e['stage']}", datetime.fromisoformat(e["acquired_at"]).timestamp(),
                              datetime.fromisoformat(e["released_at"]).timestamp()))
            waits.append(e["wait_s"])
    assert len(intervals) == 6  # dense and rerank in each run
    assert not _overlaps(intervals), f"GPU stages overlap: {_overlaps(intervals)}"
    assert max(waits) > 0.5, f"no run waited for the slot: {intervals}"
    assert "released GPU lease" not in "".join(outputs)


# A lease holder on its own: holds the slot for HOLD seconds, or SIGKILLs itself while holding it.
# t0 and t1 are the holding interval as the lease records it: from the acquisition's return to the
# start of the release (after that the server may grant the slot to the next holder).
HOLDER = """
import dataclasses, json, os, signal, sys, time
from datetime import datetime
from tasks.lease import gpu_lease, use_shared_lease_storage

use_shared_lease_storage()  # as the CLI does first thing; a no-op against a running server
stamp = lambda iso: datetime.fromisoformat(iso).timestamp()
mode, hold, limit = sys.argv[1], float(sys.argv[2]), sys.argv[3]
with gpu_lease(limit, "dense", timeout_s=400, lease_duration_s=60) as ev:
    print("ACQUIRED " + json.dumps({"t0": stamp(ev.acquired_at), **dataclasses.asdict(ev)}), flush=True)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(hold)
print("RELEASED " + json.dumps({"t0": stamp(ev.acquired_at), "t1": stamp(ev.released_at), **dataclasses.asdict(ev)}),
      flush=True)
"""


class Holder:
    """One holder process; its output goes to a file (an orphaned ephemeral server would hold a pipe open)."""

    def __init__(self, tmp: Path, name: str, mode: str, hold: float, env: dict[str, str], limit: str = "gpu"):
        self.name, self.log = name, tmp / f"{name}.log"
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, mode, str(hold), limit], env=env, cwd=REPO,
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def line(self, tag: str) -> dict | None:
        for ln in self.log.read_text().splitlines():
            if ln.startswith(tag + " "):
                return json.loads(ln[len(tag) + 1:])
        return None

    def wait_for(self, tag: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if (found := self.line(tag)) is not None:
                return found
            if self.proc.poll() is not None and tag != "ACQUIRED":
                break
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: no {tag} line in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def reap(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # with its ephemeral server child, if any
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def _ephemeral_env(home: Path) -> dict[str, str]:
    env = cli_env(home)
    env.pop("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", None)  # as a user's shell has it: the entry point sets it
    return env


def _server_env(url: str, home: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(home)}


@pytest.mark.parametrize("homes", ["shared", "distinct"])
def test_three_holders_on_a_loopback_server_take_turns(prefect_server, tmp_path, homes):
    envs = [_server_env(prefect_server, tmp_path / ("home" if homes == "shared" else f"home-{i}")) for i in range(3)]
    holders = [Holder(tmp_path, f"h{i}", "hold", 3, env, limit=f"gpu-{homes}") for i, env in enumerate(envs)]
    try:
        done = [h.wait_for("RELEASED", 180) for h in holders]
    finally:
        for h in holders:
            h.reap()
    intervals = [(h.name, d["t0"], d["t1"]) for h, d in zip(holders, done)]
    assert not _overlaps(intervals), intervals
    assert sum(d["wait_s"] > 1 for d in done) >= 2  # two of them really waited for the slot


def test_a_killed_holders_slot_comes_back_and_still_only_one_holds_it(prefect_server, tmp_path):
    """K dies holding the slot; W1 and W2 wait. The slot comes back (by our recovery on the ephemeral
    server, within seconds; by Prefect's repossession after the lease on a running server) and W1 and W2
    still take turns. On the ephemeral server W1 meanwhile holds the slot past its first lease's expiry,
    alive only by its renewal: W2's recovery, running every few seconds, never takes a live holder for a
    dead one.

    Both modes run side by side (they share nothing), so the test costs the longer of the two.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(_killed_holder_scenario, prefect_server, tmp_path / mode, mode)
                     for mode in ("ephemeral", "server")]:
            done.result()


def _killed_holder_scenario(prefect_server: str, tmp_path: Path, mode: str) -> None:
    tmp_path.mkdir()
    if mode == "ephemeral":
        env = _ephemeral_env(tmp_path / "home")
        # Past the first lease's expiry (60 s) by 15 s: only the renewal at 45 s keeps W1 alive.
        envs, hold = [env, env, env], LEASE_S + 15
    else:
        envs, hold = [_server_env(prefect_server, tmp_path / f"home-{i}") for i in range(3)], 3
    k = Holder(tmp_path, "k", "kill", 0, envs[0], limit=f"gpu-{mode}")
    holders = [k]
    try:
        killed_lease = k.wait_for("ACQUIRED", 180)["lease_id"]
        k.proc.wait(timeout=30)
        assert k.proc.returncode == -signal.SIGKILL
        killed_at = time.time()
        w1 = Holder(tmp_path, "w1", "hold", hold, envs[1], limit=f"gpu-{mode}")
        holders.append(w1)
        first = w1.wait_for("ACQUIRED", 240)
        w2 = Holder(tmp_path, "w2", "hold", 1, envs[2], limit=f"gpu-{mode}")
        holders.append(w2)
        r1 = w1.wait_for("RELEASED", hold + 60)
        r2 = w2.wait_for("RELEASED", 240)
        came_back = first["t0"] - killed_at
        if mode == "ephemeral":
            assert came_back < 45, came_back  # our recovery: the pid is gone, no need to wait for the lease
            assert f"released GPU lease {killed_lease}" in w1.log.read_text()
        else:
            assert LEASE_S - 10 <= came_back < 150, came_back  # Prefect's repossession, after the lease
            assert "released GPU lease" not in w1.log.read_text() + w2.log.read_text()
        assert r2["t0"] >= r1["t1"], (r1, r2)  # W2 got in only after W1 let go
        if mode == "ephemeral":
            # W2 was waiting (and running recovery) from before W1's first renewal until W1 let go.
            assert datetime.fromisoformat(r2["requested_at"]).timestamp() < r1["t0"] + LEASE_S * 0.75
            assert r1["t1"] - r1["t0"] >= hold
    finally:
        for h in holders:
            h.reap()
    r = subprocess.run([sys.executable, "-m", "flows.cli", "gpu-slots", "--limit-name", f"gpu-{mode}"],
                       env=envs[2], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"gpu-{mode}: 0/1 slot(s) in use" in r.stdout, r.stdout


def test_gpu_slots_lists_each_holder_with_its_lease(prefect_server, tmp_path):
    holder = Holder(tmp_path, "h", "hold", 60, _server_env(prefect_server, tmp_path / "home-h"), limit="gpu-list")
    try:
        lease = holder.wait_for("ACQUIRED", 180)["lease_id"]
        r = subprocess.run([sys.executable, "-m", "flows.cli", "gpu-slots", "--limit-name", "gpu-list"],
                           env=_server_env(prefect_server, tmp_path / "home-other"), cwd=REPO, capture_output=True,
                           text=True, timeout=180)
    finally:
        holder.reap()
    assert r.returncode == 0, r.stderr[-2000:]
    assert "gpu-list: 1/1 slot(s) in use" in r.stdout and "lease repossession" in r.stdout
    [row] = [ln for ln in r.stdout.splitlines() if lease in ln]
    assert f"pid {holder.proc.pid}@" in row and "stage dense" in row and "expires 20" in row and "[alive]" in row


# A stage's batch loop under the lease: it checks for a stop between batches, as dense, sparse and rerank do.
WORKER = """
import sys, time
from embedder.cancel import raise_if_stopped
from embedder.errors import StageError
from tasks.lease import gpu_lease

try:
    with gpu_lease(sys.argv[1], "dense", timeout_s=120, lease_duration_s=60) as ev:
        print("ACQUIRED " + ev.lease_id, flush=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 400:
            raise_if_stopped()
            time.sleep(0.5)
    print("NEVER STOPPED", flush=True)
except StageError as exc:
    print("STOPPED " + str(exc), flush=True)
    sys.exit(1)
"""


def test_a_stage_whose_lease_is_taken_away_stops_at_its_next_batch(prefect_server, tmp_path):
    """The server repossesses the lease (a holder cut off from it, an admin's reset): the holder must stop.

    Its renewal fails, and its next batch boundary raises rather than keep using a slot the server may
    already have granted to another run. The slot count never goes below zero.
    """
    import httpx

    log = tmp_path / "worker.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", WORKER, "gpu-revoked"],
                                env=_server_env(prefect_server, tmp_path / "home"), cwd=REPO, stdout=fh,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while "ACQUIRED" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        [lease_id] = [ln.split()[1] for ln in log.read_text().splitlines() if ln.startswith("ACQUIRED ")]
        httpx.post(f"{prefect_server}/v2/concurrency_limits/decrement-with-lease", json={"lease_id": lease_id},
                   timeout=30).raise_for_status()
        proc.wait(timeout=300)  # the renewal comes at 45 s; its retries take 7 s more
    finally:
        proc.kill()
    out = log.read_text()
    assert proc.returncode == 1 and "STOPPED the lease on 'gpu-revoked' was lost" in out, out[-3000:]
    limit = httpx.get(f"{prefect_server}/v2/concurrency_limits/gpu-revoked", timeout=30).json()
    assert limit["active_slots"] == 0, limit


def test_two_runs_of_one_collection_into_one_output_dir_queue_and_never_interleave(prefect_server, tmp_path):
    """A retry beside the nightly run: the second run waits for the first (collection lease), then runs."""
    data = _synthetic_collection(tmp_path / "synthetic.jsonl", 300)
    procs = []
    for name in ("a", "b"):
        env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / f"home-{name}")}
        cmd = [sys.executable, "-m", "flows.cli", "run", "--input", str(data), "--collection", "shared",
               "--output-dir", str(tmp_path / "out"), "--queries", str(SAMPLE_QUERIES), "--disable-rerank",
               "--local-files-only"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    # Each run wrote its own run set; the later one started only after the earlier one had
    # written its summary, so no stage of the two ever ran side by side.
    sets = []
    for run in (tmp_path / "out" / "shared" / "runs").iterdir():
        if (run / "processing_summary.json").is_file():
            started = json.loads((run / "run.json").read_text())["started_at"]
            finished = datetime.fromisoformat(
                json.loads((run / "processing_summary.json").read_text())["generated_at"]).timestamp()
            sets.append((started, finished))
    assert len(sets) == 2, outputs
    (s1, f1), (s2, _) = sorted(sets)
    assert s2 >= f1, f"the second run started writing at {s2} before the first finished at {f1}"
    summary = json.loads((tmp_path / "out" / "shared" / "processing_summary.json").read_text())
    assert summary["status"] == "completed" and summary["index_run"]["points_count"] == 300, summary["warnings"]
