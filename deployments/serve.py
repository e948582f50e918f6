"""The simplest runner: serve both deployments from this process, schedule active.

Usage (from the project root, against a running server):
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python deployments/serve.py

`prefect.serve` needs no work pool; runs execute in this process's subprocesses.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prefect import serve  # noqa: E402

from flows.embed_collections import embed_collections  # noqa: E402


def build_deployments() -> list:
    """The `nightly` and `manual` deployments, as prefect.yaml defines them."""
    nightly = embed_collections.to_deployment(
        name="nightly", cron="0 2 * * *", tags=["embedding", "gpu", "nightly"],
        parameters={"config_file": str(ROOT / "deployments" / "nightly.toml")},
        description="Re-embed the collections listed in deployments/nightly.toml every night.",
    )
    manual = embed_collections.to_deployment(
        name="manual", tags=["embedding", "gpu", "manual"],
        description="On-demand runs from the Prefect UI's parameter form (no schedule).",
    )
    return [nightly, manual]


if __name__ == "__main__":
    serve(*build_deployments())
