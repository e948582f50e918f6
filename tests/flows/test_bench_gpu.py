"""bench/gpu.py keeps working: its tiny run on this host, flow and raw side by side, with every figure filled in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from embedder.gpu import resolve_device
from tests.helpers.homes import cli_env

REPO = Path(__file__).resolve().parents[2]


def test_gpu_bench_tiny_run_reports_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    env = cli_env(tmp_path / "home", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    device = resolve_device()
    assert data["device"] == device
    r = data["sizes"]["minilm"]
    assert r["run"]["status"] == "completed" and r["docs"] == 64 and r["pairs"] == 4 * 8
    for stage, unit in (("dense", "docs"), ("rerank", "pairs")):
        s = r[stage]
        assert s[f"raw_{unit}_per_s"] > 0 and s[f"flow_{unit}_per_s"] > 0 and s["ratio"] > 0
        # The lease is held around the stage's GPU work, and never for less than that work.
        assert s["lease"]["held_s"] >= s["lease"]["gpu_work_s"] > 0
    dense = r["dense"]
    assert dense["precision"] == ("fp32" if device == "cpu" else dense["precision"])
    assert dense["cosine_to_fp32"]["min"] >= 0.999
    if r["rerank"]["precision"] == "fp32":
        assert r["rerank"]["top10_overlap_with_fp32"] == 1.0
    assert r["splade"]["device"] == device
    memory = r["memory"]
    assert memory["soft_limit_exceeded"] is False
    if device == "cpu":
        assert memory["summary_gpu_peak_gb"] == 0.0 and memory["memory_source"] == "none" and r["run"]["gpu"] is None
    else:
        # The summary's device figure agrees with NVML's own sampling of the process.
        assert abs(memory["summary_gpu_peak_gb"] - memory["nvml_process_peak_gb"]) <= 0.5
        assert r["dense"]["gpu"]["samples"] > 0
