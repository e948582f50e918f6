"""The ways users run deployments, live: a real `prefect server start` (with its UI), `prefect deploy --all`,
a real worker on the `embedding` pool, the scheduler, and the UI's run form in a real headless browser.

Nothing here reads back what was registered and calls it working: schedules must create runs, a run
scheduled by an interval must complete by itself through the worker, and a run submitted from the
browser's form must complete and write its summary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, SAMPLE_DIR, start_prefect_server, stop_process_groups

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# A run of the sample collection through a worker (parent plus its collection child) takes about a
# minute here; the limit only bounds a hung test.
RUN_TIMEOUT_S = 900


class Live:
    """A server, its deployments and a worker, with a client on the server's API."""

    def __init__(self, api: str, env: dict[str, str], server_log: Path) -> None:
        self.api, self.env, self.server_log = api, env, server_log
        self.ui = api.removesuffix("/api")

    def client(self) -> Any:
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api)

    def deployment(self, name: str) -> Any:
        with self.client() as client:
            return client.read_deployment_by_name(name)

    def flow_runs(self, deployment_id: Any) -> list[Any]:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        only = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        with self.client() as client:
            return client.read_flow_runs(deployment_filter=only)

    def wait_final(self, flow_run_id: Any, timeout_s: float = RUN_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while True:
                run = client.read_flow_run(flow_run_id)
                if run.state is not None and run.state.is_final():
                    return run
                assert time.monotonic() < deadline, f"flow run {flow_run_id} still {run.state_name} after {timeout_s} s"
                time.sleep(2)


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    home = tmp_path_factory.mktemp("live-server")
    # The scheduler as users run it, visiting the deployments every 10 s instead of 60 s: what is under
    # test is that its visits create runs the worker completes, not how long it sleeps between them.
    server, api = start_prefect_server(home, ui=True,
                                       extra_env={"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "10"})
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path_factory.mktemp("live-client")),
           "EMBEDDER_PROJECT_DIR": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    worker = None
    try:
        # As the README says: the pool and the GPU limit, the three deployments, one worker.
        r = _cli([sys.executable, "deployments/setup.py"], env)
        assert r.returncode == 0, r.stdout + r.stderr
        r = _cli([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], env)
        assert r.returncode == 0, r.stdout + r.stderr
        worker_log = open(home / "worker.log", "w")
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "embedding"],
                                  env=env, cwd=REPO, stdout=worker_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        worker_log.close()
        yield Live(api, env, home / "server.log")
    finally:
        stop_process_groups([p for p in (worker, server) if p is not None])


def _sample_config(out: Path) -> dict[str, Any]:
    return {"collections": [{"name": "sample", "path": str(SAMPLE_DIR)}], "output_dir": str(out),
            "local_files_only": True, "rerank": {"enabled": False}}


def test_the_scheduler_creates_runs_for_the_nightly_cron(live):
    nightly = live.deployment("embed-collections/nightly")
    deadline = time.monotonic() + 90  # the scheduler's loop runs every 10 s here (60 s by default)
    while not (runs := [r for r in live.flow_runs(nightly.id) if r.state_name == "Scheduled"]):
        assert time.monotonic() < deadline, "no Scheduled run of nightly: " + live.server_log.read_text()[-3000:]
        time.sleep(2)
    starts = sorted(r.expected_start_time for r in runs)
    # 0 2 * * * UTC: every run it scheduled starts at 02:00 UTC of a coming day.
    assert all(t.astimezone(UTC).hour == 2 and t.minute == 0 and t > datetime.now(UTC) for t in starts), starts
    assert all(r.parameters == {"config_file": "deployments/nightly.toml"} for r in runs)


def test_an_interval_schedule_fires_by_itself_and_its_run_completes_through_the_worker(live, tmp_path):
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import IntervalSchedule

    manual = live.deployment("embed-collections/manual")
    out = tmp_path / "out"
    schedule = DeploymentScheduleCreate(
        # Anchored a little ahead, so the first occurrence is that anchor, not a whole interval away.
        schedule=IntervalSchedule(interval=timedelta(seconds=60),
                                  anchor_date=datetime.now(UTC) + timedelta(seconds=15)),
        max_scheduled_runs=1, parameters={"config": _sample_config(out)})
    with live.client() as client:
        [created] = client.create_deployment_schedules(manual.id, [schedule])
    try:
        # No API call creates the run: the server's scheduler does, and the worker picks it up.
        deadline = time.monotonic() + 240
        while not (runs := [r for r in live.flow_runs(manual.id) if r.auto_scheduled]):
            assert time.monotonic() < deadline, "the interval schedule never created a run"
            time.sleep(2)
        first = min(runs, key=lambda r: r.expected_start_time)
        final = live.wait_final(first.id)
    finally:
        with live.client() as client:
            client.delete_deployment_schedule(manual.id, created.id)
    assert final.state.is_completed(), (final.state, live.server_log.read_text()[-2000:])
    summary = json.loads((out / "sample" / "processing_summary.json").read_text())
    assert summary["status"] == "completed" and summary["chunk_count"] == 50, summary["warnings"]
    assert summary["run_id"] == str(first.id)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_a_run_submitted_from_the_ui_form_completes(live, tmp_path):
    from playwright.sync_api import sync_playwright

    manual = live.deployment("embed-collections/manual")
    out = tmp_path / "ui-out"

    def field(page: Any, label: str, kind: str = "textarea") -> Any:
        # The form's input for a label: the first one inside the label's nearest enclosing field.
        return page.locator(f"xpath=//*[normalize-space(text())='{label}']/ancestor::*[.//{kind}][1]//{kind}").first

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1250})  # down to the output dir
            page.goto(f"{live.ui}/deployments/deployment/{manual.id}/run", wait_until="networkidle", timeout=120_000)
            page.get_by_role("button", name="Add item").first.click()
            field(page, "Name").fill("ui_sample")
            field(page, "Path").fill(str(SAMPLE_DIR))
            field(page, "Output Dir (Optional)").fill(str(out))
            local_only = field(page, "Local Files Only (Optional)", "input")
            local_only.locator("xpath=..").click()  # the checkbox is drawn as a toggle over it
            assert local_only.is_checked()
            field(page, "Name").scroll_into_view_if_needed()
            # The docs' screenshot is refreshed on request only: a test run leaves the work tree as it was.
            page.screenshot(path=os.environ.get("EMBEDDER_UI_SCREENSHOT", str(tmp_path / "ui-run-form.png")))
            page.get_by_role("button", name="Submit").click()

            def ours() -> list[Any]:
                return [r for r in live.flow_runs(manual.id) if not r.auto_scheduled
                        and r.parameters.get("config", {}).get("output_dir") == str(out)]

            # The run exists once the server answered the form's request; on a loaded machine that has
            # taken over a minute, so wait for the run itself, then for the UI to leave the form.
            deadline = time.monotonic() + 600
            while not ours() and time.monotonic() < deadline:
                time.sleep(1)
            page.wait_for_url(re.compile(rf".*/deployments/deployment/{manual.id}(\?.*)?$"), timeout=300_000)
        finally:
            browser.close()

    submitted = ours()
    assert len(submitted) == 1, [r.parameters for r in live.flow_runs(manual.id)]
    config = submitted[0].parameters["config"]
    assert config["collections"] == [{"name": "ui_sample", "path": str(SAMPLE_DIR)}] and config["local_files_only"]
    final = live.wait_final(submitted[0].id)
    assert final.state.is_completed(), final.state
    summary = json.loads((out / "ui_sample" / "processing_summary.json").read_text())
    # The default rerank model is not on this machine: rerank degrades, the run is partial, as designed.
    assert summary["status"] in ("completed", "partial") and summary["chunk_count"] == 50
    assert summary["dense_run"]["total_embeddings_generated"] == 50


def test_the_scheduler_logged_no_error_while_it_scheduled_and_ran(live):
    # Last in this module: the server has been up through every test above (minutes). Only the
    # scheduler's own errors count: on a loaded machine SQLite can answer "database is locked" to a
    # worker's heartbeat, which the server logs and the worker's next heartbeat repairs.
    lines = live.server_log.read_text().splitlines()
    scheduler = [line for line in lines if "services.scheduler" in line and ("ERROR" in line or "WARNING" in line)]
    assert not scheduler, "\n".join(scheduler[:20])
    assert not [line for line in lines if "bulk DML" in line or "InvalidRequestError" in line]
