"""`python deployments/serve.py` as users run it: against a real server, a manual run with default
settings completes (its collection fans out to the served `collection` deployment), and SIGTERM stops it
while a run is in flight."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, SAMPLE_DIR, SCIFACT, process_group_gone, start_prefect_server, stop_process_group

pytestmark = pytest.mark.slow


def test_serve_runs_a_manual_run_with_default_settings_and_stops_on_sigterm(tmp_path):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.exceptions import ObjectNotFound

    (tmp_path / "server-home").mkdir()
    server, api = start_prefect_server(tmp_path / "server-home")
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "home")}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen([sys.executable, "deployments/serve.py"], cwd=REPO, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with SyncPrefectClient(api) as client:
            deadline = time.monotonic() + 300
            while True:
                try:
                    manual = client.read_deployment_by_name("embed-collections/manual")
                    client.read_deployment_by_name("embed-collection/collection")
                    break
                except ObjectNotFound:
                    assert serve.poll() is None, log.read_text()[-3000:]
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(1)
            # Default settings but the input: collection_fanout "auto" fans two collections out.
            config = {"collections": [{"name": "served", "path": str(SAMPLE_DIR)},
                                      {"name": "served-too", "path": str(SAMPLE_DIR)}],
                      "output_dir": str(tmp_path / "out"), "local_files_only": True}
            run = client.create_flow_run_from_deployment(manual.id, parameters={"config": config})
            deadline = time.monotonic() + 900
            while not (state := client.read_flow_run(run.id).state).is_final():
                assert serve.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(2)
            assert state.is_completed(), (state, log.read_text()[-4000:])
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
            child_deployments = {c.deployment_id for c in children}
            collection = client.read_deployment_by_name("embed-collection/collection")
        for name in ("served", "served-too"):
            summary = json.loads((tmp_path / "out" / name / "processing_summary.json").read_text())
            assert summary["status"] in ("completed", "partial") and summary["chunk_count"] == 50
            assert summary["run_id"] == str(run.id)
        assert len(children) == 2 and child_deployments == {collection.id}, \
            "the collections did not run as the served deployment"

        # SIGTERM while a run is in its dense stage: serve.py cancels it (and its collection's run), pauses
        # its schedules and exits; nothing it started is left running.
        big = tmp_path / "big.jsonl"
        with open(SCIFACT / "corpus.jsonl") as src, open(big, "w") as dst:
            for line in itertools.islice(src, 1200):
                doc = json.loads(line)
                dst.write(json.dumps({"id": doc["_id"], "text": f"{doc['title']}. {doc['text']}"}) + "\n")
        with SyncPrefectClient(api) as client:
            busy = client.create_flow_run_from_deployment(manual.id, parameters={"config": {
                **config, "collections": [{"name": "big", "path": str(big)}], "rerank": {"enabled": False},
                # One collection runs in-process under auto; fan it out so serve.py must stop its child too.
                "orchestration": {"collection_fanout": "deployments"}}})
            deadline = time.monotonic() + 600
            while "big dense: " not in log.read_text():
                assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
            t0 = time.monotonic()
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=300)
            print(f"serve.py stopped {time.monotonic() - t0:.1f} s after SIGTERM, with a run in flight")
            assert process_group_gone(serve.pid, wait_s=30), "a process of serve.py outlived it"
            busy_children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[busy.id])))
            states = {r.name: r.state_name for r in [client.read_flow_run(busy.id), *busy_children]}
            nightly = client.read_deployment_by_name("embed-collections/nightly")
        assert set(states.values()) == {"Cancelled"} and len(states) == 2, states
        assert nightly.paused or not any(s.active for s in nightly.schedules), "serve.py left its schedule active"
        assert serve.returncode == 0 and "Traceback" not in log.read_text(), log.read_text()[-3000:]
    finally:
        if not process_group_gone(serve.pid):
            os.killpg(serve.pid, signal.SIGKILL)
        stop_process_group(server)
