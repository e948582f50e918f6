"""Plot per-stage time (in a real flow vs raw) and per-stage latency at scale into docs/benchmarks.png.

Reads bench/results/stages.json and bench/results/scale.json. `make docs` runs it, so the page shows
what the committed results say. Usage: python bench/plot.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, RESULTS  # noqa: E402


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = json.loads((RESULTS / "stages.json").read_text())["stages"]
    scale = json.loads((RESULTS / "scale.json").read_text())["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))

    names = [n for n in ("dense", "sparse", "rerank") if stages.get(n, {}).get("ratio") is not None]
    x = range(len(names))
    raw = [stages[n]["raw_s"] for n in names]
    flow = [stages[n]["in_flow_s"] for n in names]
    ax1.bar([i - 0.2 for i in x], raw, width=0.4, label="raw library call (load included)")
    ax1.bar([i + 0.2 for i in x], flow, width=0.4, label="task run inside the flow")
    for i, n in enumerate(names):
        ax1.text(i, max(raw[i], flow[i]) * 1.15, f"ratio {stages[n]['ratio']:.2f}", ha="center", fontsize=9)
    ax1.set_xticks(list(x), names)
    ax1.set_yscale("log")
    ax1.set_ylabel("seconds (log)")
    ax1.set_title("Stages in a real flow vs raw, 1,000 SciFact abstracts, 2-core CPU")
    ax1.legend()

    sizes = [r["chunks"] for r in scale]
    for stage in ("dense", "sparse", "index", "fuse"):
        ax2.plot(sizes, [r["stage_ms"][stage] / 1000 for r in scale], marker="o", label=stage)
    ax2.plot(sizes, [r["wall_s"] for r in scale], marker="s", linestyle="--", color="black", label="whole run")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("chunks")
    ax2.set_ylabel("seconds (log)")
    ax2.set_title("Latency per stage vs collection size")
    ax2.legend()
    fig.tight_layout()
    out = REPO / "docs" / "benchmarks.png"
    # No software or date stamp: the same results draw the same bytes, so `make docs` leaves git clean.
    fig.savefig(out, dpi=110, metadata={"Software": None})
    print(out)


if __name__ == "__main__":
    main()
