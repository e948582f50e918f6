"""Check the Prefect UI as a person would: a real server, a real deployment run, headless Chromium.

Starts `prefect server start` on loopback, creates the work pool and deploys
both deployments, runs the `manual` deployment on the sample collection through
a worker, then opens three UI pages in headless Chromium (Debian's `chromium`):
the flow run, the collection's summary artifact and the deployment's run form.
It asserts on the rendered DOM text and saves screenshots under docs/.

Not run by CI (needs Chromium; about a minute). Usage: python bench/ui_check.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, start_prefect_server  # noqa: E402

DOCS = REPO / "docs"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", "--window-size=1440,1000", "--virtual-time-budget=20000"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chrome(url: str, profile: Path, screenshot: Path | None = None) -> str:
    args = [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    if screenshot is not None:
        subprocess.run([*args, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    return dom


def main() -> int:
    if CHROMIUM is None:
        print("chromium not found: apt-get install chromium", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="ui-check-"))
    port = _port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": api, "EMBEDDER_PROJECT_DIR": str(REPO)}
    # The bundled UI calls the API at PREFECT_UI_API_URL (default port 4200).
    server, _ = start_prefect_server(tmp / "home", port, ui=True, extra_env={"PREFECT_UI_API_URL": api})
    checks: dict[str, bool] = {}
    try:
        run = lambda *a: subprocess.run(a, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)  # noqa: E731
        assert run(sys.executable, "deployments/setup.py").returncode == 0
        assert run(sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all").returncode == 0
        with httpx.Client(base_url=api, timeout=30) as c:
            dep = c.get("/deployments/name/embed-collections/manual").json()
            sample = str(REPO / "examples/sample_collection")
            params = {"config": {"collections": [{"name": "ui_sample", "path": sample}],
                                 "queries_path": str(REPO / "examples/queries.jsonl"),
                                 "output_dir": str(tmp / "out"), "local_files_only": True}}
            flow_run = c.post(f"/deployments/{dep['id']}/create_flow_run", json={"parameters": params}).json()
        worker = run(sys.executable, "-m", "prefect", "worker", "start", "--pool", "embedding", "--run-once")
        with httpx.Client(base_url=api, timeout=30) as c:
            state = c.get(f"/flow_runs/{flow_run['id']}").json()["state"]["type"]
            arts = c.post("/artifacts/filter", json={"artifacts": {"key": {"any_": ["summary-ui-sample"]}}}).json()
        checks["flow run completed"] = state == "COMPLETED"
        if state != "COMPLETED":
            print(worker.stdout[-3000:], worker.stderr[-3000:], file=sys.stderr)
        base = f"http://127.0.0.1:{port}"
        DOCS.mkdir(exist_ok=True)
        dom = _chrome(f"{base}/runs/flow-run/{flow_run['id']}", tmp / "p1", DOCS / "ui-flow-run.png")
        checks["flow run page shows the run"] = flow_run["name"] in dom
        art_id = arts[0]["id"] if arts else "missing"
        dom = _chrome(f"{base}/artifacts/artifact/{art_id}", tmp / "p2", DOCS / "ui-summary-artifact.png")
        checks["summary artifact renders"] = "Dense: all-minilm-l6-v2" in dom
        dom = _chrome(f"{base}/deployments/deployment/{dep['id']}/run", tmp / "p3", DOCS / "ui-run-form.png")
        checks["deployment run form shows RunConfig fields"] = "rerank_top_k" in dom or "Rerank Top K" in dom
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    print(json.dumps({"ui_version": "prefect 3.8.8 bundled UI", "checks": checks,
                      "screenshots": sorted(p.name for p in DOCS.glob("ui-*.png"))}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
