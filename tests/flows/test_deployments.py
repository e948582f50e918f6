"""Deployments against a real temporary `prefect server start`: deploy, manual run by a worker, retry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SAMPLE_DIR, SAMPLE_QUERIES

pytestmark = pytest.mark.slow


def _env(api_url: str, home: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home), "EMBEDDER_PROJECT_DIR": str(REPO)}


def _cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_prefect_yaml_is_well_formed():
    from prefect.flows import load_flow_from_entrypoint

    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = {d["name"]: d for d in doc["deployments"]}
    assert set(names) == {"nightly", "manual", "collection"}
    assert names["nightly"]["schedules"][0]["cron"] and not names["manual"]["schedules"]
    for d in (names["nightly"], names["manual"]):
        assert d["work_pool"]["name"] == "embedding" and d["concurrency_limit"] >= 1 and "gpu" in d["tags"]
        flow = load_flow_from_entrypoint(d["entrypoint"])
        flow.validate_parameters(d["parameters"])
    # The per-collection deployment the parent fans out to: the flow's default name, no schedule.
    child = names["collection"]
    assert not child["schedules"] and child["work_pool"]["name"] == "embedding"
    assert load_flow_from_entrypoint(child["entrypoint"]).name == "embed-collection"
    assert "set_working_directory" in str(doc["pull"])


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("deploy-home")
    env = _env(prefect_server, home)
    r = _cli([sys.executable, "deployments/setup.py", "--gpus", "1"], env)
    assert r.returncode == 0, r.stderr
    r2 = _cli([sys.executable, "deployments/setup.py", "--gpus", "1"], env)  # idempotent
    assert r2.returncode == 0 and "created" not in r2.stdout.split(";")[0]
    r = _cli([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    return env


def _client(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Ctx:
        def __enter__(self):
            self._settings = temporary_settings(updates={PREFECT_API_URL: api_url})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc):
            self._client.__exit__(*exc)
            self._settings.__exit__(*exc)

    return _Ctx()


def test_deploy_registers_both_with_schedules_and_forms(prefect_server, deployed):
    with _client(prefect_server) as client:
        nightly = client.read_deployment_by_name("embed-collections/nightly")
        manual = client.read_deployment_by_name("embed-collections/manual")
        gpu = client.read_global_concurrency_limit_by_name("gpu")
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert manual.schedules == []
    assert nightly.parameters == {"config_file": "deployments/nightly.toml"}
    schema = manual.parameter_openapi_schema
    assert "config" in schema["properties"] and "RunConfig" in json.dumps(schema)
    assert {"embedding", "gpu"} <= set(nightly.tags) and nightly.work_pool_name == "embedding"
    assert gpu.limit == 1
    # The run form shows the settings in sections, each a described fieldset of its own model.
    defs = schema.get("definitions") or schema.get("$defs") or {}
    run_config = defs["RunConfig"]["properties"]
    for section in ("dense", "sparse", "fuse", "rerank", "index", "gpu", "stream", "orchestration"):
        ref = run_config[section].get("$ref") or run_config[section]["allOf"][0]["$ref"]
        model = defs[ref.rsplit("/", 1)[-1]]
        assert model["properties"] and model.get("description"), section
    assert "flat_names" not in run_config and "rrf_k" in defs["FuseSettings"]["properties"]


def _run_worker_once(env: dict[str, str]) -> subprocess.CompletedProcess:
    return _cli([sys.executable, "-m", "prefect", "worker", "start", "--pool", "embedding", "--run-once"], env,
                timeout=400)


def _wait_final(client, flow_run_id, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state and run.state.is_final():
            return run
        time.sleep(1)
    return client.read_flow_run(flow_run_id)


def test_manual_run_then_failed_run_retried_from_cache(prefect_server, deployed, tmp_path, tiny_cross_encoder):
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentTaskRunId,
    )
    from prefect.states import Scheduled

    out = tmp_path / "out"
    # The run's settings file is written with the flat names of earlier releases: the run reads them into
    # their sections and its summary says which to rewrite. The form's own values are sectioned.
    old_file = tmp_path / "old-settings.toml"
    old_file.write_text(f'[embedder]\nrerank_model = "{tiny_cross_encoder}"\nqueries_path = "{SAMPLE_QUERIES}"\n')
    config = {"collections": [{"name": "manual_sample", "path": str(SAMPLE_DIR)}],
              "output_dir": str(out), "local_files_only": True,
              # One `--run-once` worker below: the collection runs in-process (tests/flows/test_fleet.py fans out).
              "orchestration": {"collection_fanout": "subflows"}}
    with _client(prefect_server) as client:
        dep = client.read_deployment_by_name("embed-collections/manual")
        # A script that still sends flat names to the redeployed form is refused, naming them.
        with pytest.raises(Exception, match="rerank_model"):
            client.create_flow_run_from_deployment(dep.id, parameters={"config": {**config, "rerank_model": "x"}})
        run = client.create_flow_run_from_deployment(dep.id, parameters={"config": config,
                                                                         "config_file": str(old_file)})
    r = _run_worker_once(deployed)
    with _client(prefect_server) as client:
        final = _wait_final(client, run.id)
        assert final.state.is_completed(), (final.state, r.stdout[-3000:], r.stderr[-3000:])
        sub = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=False)),
            task_run_filter=None)
        sub_ids = [s.id for s in sub if s.name == "embed-collection-manual_sample"]
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=sub_ids)))
    assert {"summary-manual-sample", "stage-manual-sample-dense"} <= {a.key for a in arts}
    written = json.loads((out / "manual_sample" / "processing_summary.json").read_text())
    assert written["status"] == "completed"
    assert written["config"]["rerank"]["model"] == str(tiny_cross_encoder)
    assert written["rerank_run"]["status"] == "executed"
    assert any("rerank_model -> rerank.model" in w and "queries_path" not in w
               for w in written["warnings"]), written["warnings"]

    # A run that fails after its stages finished: the summary path is blocked by a directory.
    out2 = tmp_path / "out2"
    blocker = out2 / "manual_sample" / "processing_summary.json"
    blocker.mkdir(parents=True)
    config2 = {**config, "output_dir": str(out2), "queries_path": str(SAMPLE_QUERIES),
               "rerank": {"model": str(tiny_cross_encoder)}}
    with _client(prefect_server) as client:
        run2 = client.create_flow_run_from_deployment(dep.id, parameters={"config": config2})
    _run_worker_once(deployed)
    with _client(prefect_server) as client:
        assert _wait_final(client, run2.id).state.is_failed()
    shutil.rmtree(blocker)
    with _client(prefect_server) as client:
        client.set_flow_run_state(run2.id, Scheduled(name="AwaitingRetry"), force=True)
    r = _run_worker_once(deployed)
    with _client(prefect_server) as client:
        final2 = _wait_final(client, run2.id)
    assert final2.state.is_completed(), (final2.state, r.stdout[-3000:])
    summary = json.loads((out2 / "manual_sample" / "processing_summary.json").read_text())
    # `cached` is set from the tasks' Prefect state name ("Cached") by the flow.
    stages = summary["telemetry"]["stages"]
    assert stages["dense"]["cached"] and stages["sparse"]["cached"] and stages["rerank"]["cached"], (
        {k: v["cached"] for k, v in stages.items()}, r.stdout[-4000:])
    assert summary["status"] == "completed", summary["warnings"]


def test_auto_fanout_runs_collections_in_process_when_the_collection_deployment_is_missing(prefect_server, deployed):
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    from embedder.settings import CollectionInput, RunConfig
    from tasks.fanout import fan_out_to_deployments

    two = [CollectionInput(name=name, path=str(SAMPLE_DIR)) for name in ("one", "two")]

    @flow
    def fans_out(collection_deployment: str) -> bool:
        config = RunConfig(collections=two, orchestration={"collection_deployment": collection_deployment})
        return fan_out_to_deployments(config, "a-deployment-run")

    with temporary_settings(updates={PREFECT_API_URL: prefect_server, PREFECT_LOGGING_TO_API_ENABLED: False}):
        assert fans_out("embed-collection/collection") is True  # deployed by `prefect deploy --all`
        # One collection has nothing to spread over workers: it runs in the deployment's own flow run.
        one = RunConfig(collections=two[:1])
        assert fan_out_to_deployments(one, "a-deployment-run") is False
        assert fan_out_to_deployments(
            one.model_copy(update={"orchestration.collection_fanout": "deployments"}), "a-deployment-run") is True
        assert fans_out("embed-collection/not-deployed") is False
        # Outside a deployment, and when the config says so, no server lookup decides it.
        assert fan_out_to_deployments(RunConfig(), None) is False
        subflows = RunConfig(orchestration={"collection_fanout": "subflows"})
        assert fan_out_to_deployments(subflows, "a-deployment-run") is False
