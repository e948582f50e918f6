"""A fleet on Prefect's own machinery, as the README's recipe runs it.

PostgreSQL in a temp dir on a loopback port, `prefect server start` on it, the
`embedding` process pool with two workers (each its own PREFECT_HOME and its own
simulated host, so its own GPU limit `gpu-<host>`), `prefect deploy --all` from
prefect.yaml, then a four-collection run through the `manual` deployment: the
parent fans the collections out as flow runs of the `collection` deployment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import (
    REPO,
    SAMPLE_DIR,
    SAMPLE_QUERIES,
    free_port,
    start_prefect_server,
    stop_process_group,
    stop_process_groups,
)

pytestmark = pytest.mark.slow

PG_BIN = Path(os.environ.get("EMBEDDER_PG_BIN", "/usr/lib/postgresql/15/bin"))
HOSTS = ("host-a", "host-b")


def _as_postgres() -> list[str]:
    # initdb refuses to run as root.
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields Prefect's database URL for it."""
    if not (PG_BIN / "initdb").is_file():
        message = f"PostgreSQL binaries not found under {PG_BIN} (set EMBEDDER_PG_BIN)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="embedder-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    run = [*_as_postgres()]
    subprocess.run([*run, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    subprocess.run([*run, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "pg.log"), "-w", "-t", "60",
                    "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True, timeout=120)
    try:
        subprocess.run([*run, str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "prefect"], check=True, capture_output=True, timeout=60)
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    finally:
        subprocess.run([*run, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _env(api_url: str, home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home), "EMBEDDER_PROJECT_DIR": str(REPO),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


def _client(api_url: str):  # noqa: ANN202 - a context manager over prefect's sync client
    from tests.flows.test_deployments import _client as client

    return client(api_url)


@pytest.fixture(scope="module")
def fleet(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The server on PostgreSQL, the pool and per-host limits, the deployments, and two running workers."""
    home = tmp_path_factory.mktemp("fleet-server")
    server, url = start_prefect_server(home, {"PREFECT_API_DATABASE_CONNECTION_URL": postgres})
    workers: list[subprocess.Popen] = []
    try:
        admin = _env(url, tmp_path_factory.mktemp("fleet-admin"))
        for cmd in ([sys.executable, "deployments/setup.py", "--limit-name", "gpu-{host}", "--hosts", ",".join(HOSTS),
                     "--pool-concurrency", "6"],
                    [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]):
            r = subprocess.run(cmd, env=admin, cwd=REPO, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr
        logs = {}
        for host in HOSTS:
            whome = tmp_path_factory.mktemp(f"worker-{host}")
            logs[host] = whome / "worker.log"
            with open(logs[host], "w") as log:
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "prefect", "worker", "start", "--pool", "embedding", "--name",
                     f"worker-{host}", "--limit", "2"],
                    env=_env(url, whome, EMBEDDER_HOST=host, PREFECT_WORKER_QUERY_SECONDS="2"), cwd=REPO,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        yield {"url": url, "logs": logs}
    finally:
        # The workers' own flow runs have ended with the test; nothing is lost by not waiting long.
        stop_process_groups(workers, timeout_s=10)
        stop_process_group(server)


def _collections(tmp: Path) -> list[dict[str, str]]:
    """Four rag_clean collections cut from the sample (two or three chunk files each)."""
    files = sorted(SAMPLE_DIR.glob("*chunks*.json"))
    out = []
    for i in range(4):
        d = tmp / f"col{i}"
        d.mkdir()
        for f in files[i::4]:
            shutil.copy(f, d / f.name)
        out.append({"name": f"fleet_{i}", "path": str(d)})
    return out


def _intervals(events: list[dict]) -> list[tuple[datetime, datetime, str]]:
    return sorted((datetime.fromisoformat(e["acquired_at"]), datetime.fromisoformat(e["released_at"]), e["stage"])
                  for e in events)


def test_four_collections_fan_out_over_two_workers_with_a_gpu_budget_per_host(fleet, tmp_path,
                                                                              tiny_cross_encoder):
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterDeploymentId,
    )

    out = tmp_path / "out"
    collections = _collections(tmp_path)
    config = {"collections": collections, "queries_path": str(SAMPLE_QUERIES), "output_dir": str(out),
              "local_files_only": True, "rerank": {"model": str(tiny_cross_encoder)},
              "gpu": {"concurrency_limit_name": "gpu-{host}", "lease_duration_s": 60}}
    with _client(fleet["url"]) as client:
        manual = client.read_deployment_by_name("embed-collections/manual")
        child_dep = client.read_deployment_by_name("embed-collection/collection")
        parent = client.create_flow_run_from_deployment(manual.id, parameters={"config": config})
        deadline = time.time() + 900
        while time.time() < deadline:
            parent = client.read_flow_run(parent.id)
            if parent.state and parent.state.is_final():
                break
            time.sleep(2)
        logs = "\n".join(f"--- {h}\n{p.read_text()[-4000:]}" for h, p in fleet["logs"].items())
        assert parent.state.is_completed(), (parent.state, logs)
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[child_dep.id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[parent.id])))

    # Every collection ran as its own flow run of the per-collection deployment, and completed.
    assert sorted(c.name for c in children) == sorted(f"embed-collection-{c['name']}" for c in collections)
    assert all(c.state.is_completed() for c in children), [(c.name, c.state) for c in children]
    summaries = {c["name"]: json.loads((out / c["name"] / "processing_summary.json").read_text())
                 for c in collections}
    assert {s["status"] for s in summaries.values()} == {"completed"}
    assert all(s["run_id"] == str(parent.id) for s in summaries.values())

    # Both workers (simulated hosts) ran collections, each under its own host's GPU limit.
    by_host: dict[str, list[dict]] = {}
    for s in summaries.values():
        events = s["telemetry"]["lease_events"]
        assert {e["stage"] for e in events} >= {"dense", "rerank"}
        assert len({e["host"] for e in events}) == 1  # a collection runs on one host
        for e in events:
            assert e["limit_name"] == f"gpu-{e['host']}"
            by_host.setdefault(e["host"], []).append(e)
    assert set(by_host) == set(HOSTS), by_host.keys()

    # On each host the GPU stages never overlap (the two hosts may well overlap each other).
    for host, events in by_host.items():
        spans = _intervals(events)
        for (_, end, stage), (start, _, nxt) in zip(spans, spans[1:]):
            assert start >= end, f"{host}: {nxt} acquired at {start} while {stage} held the slot until {end}"

    # The parent's roll-up lists all four, with each child's flow run id and state.
    [rollup] = [a for a in artifacts if a.key == "rollup-collections"]
    rows = json.loads(rollup.data) if isinstance(rollup.data, str) else rollup.data
    assert {r["collection"] for r in rows} == {c["name"] for c in collections}
    assert {r["flow_run_id"] for r in rows} == {str(c.id) for c in children}
    assert {(r["state"], r["status"]) for r in rows} == {("Completed", "completed")}
