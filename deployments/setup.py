"""Idempotently create the `embedding` process work pool and the `gpu` global concurrency limit.

Usage:
    python deployments/setup.py [--gpus N] [--pool embedding] [--limit-name gpu]

Run it once per Prefect server (again is harmless). With several GPU hosts, set
--gpus to the number of GPUs that share the one limit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.actions import WorkPoolCreate  # noqa: E402
from prefect.exceptions import ObjectAlreadyExists  # noqa: E402


def setup(pool: str = "embedding", limit_name: str = "gpu", gpus: int = 1, pool_concurrency: int = 4) -> dict:
    """Create (or update) the pool and the limit; return what exists afterwards."""
    if gpus < 1:
        raise ValueError("--gpus must be at least 1")
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", concurrency_limit=pool_concurrency))
            created_pool = True
        except ObjectAlreadyExists:
            created_pool = False
        client.upsert_global_concurrency_limit_by_name(limit_name, gpus)
        limit = client.read_global_concurrency_limit_by_name(limit_name)
        work_pool = client.read_work_pool(pool)
    return {"pool": work_pool.name, "pool_type": work_pool.type, "pool_created": created_pool,
            "limit": limit.name, "limit_slots": limit.limit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="embedding")
    parser.add_argument("--limit-name", default="gpu")
    parser.add_argument("--gpus", type=int, default=1, help="slots of the GPU limit (number of GPUs)")
    parser.add_argument("--pool-concurrency", type=int, default=4)
    args = parser.parse_args()
    result = setup(args.pool, args.limit_name, args.gpus, args.pool_concurrency)
    print(f"work pool {result['pool']!r} ({result['pool_type']}){' created' if result['pool_created'] else ''}; "
          f"global concurrency limit {result['limit']!r} = {result['limit_slots']} slot(s)")
    print(f"before `prefect worker start --pool {args.pool}`: export EMBEDDER_PROJECT_DIR={ROOT}")


if __name__ == "__main__":
    main()
