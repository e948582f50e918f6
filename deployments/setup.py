"""Idempotently create the `embedding` process work pool and the GPU global concurrency limit(s).

Usage:
    python deployments/setup.py [--gpus N] [--pool embedding] [--limit-name gpu]
    python deployments/setup.py --limit-name 'gpu-{host}' --hosts gpu-a,gpu-b [--gpus N]

Run it once per Prefect server (again is harmless). A fleet has two choices:
one shared limit of N slots (``--gpus N``: any N GPU stages at once, wherever
they run), or a budget per host (``--limit-name 'gpu-{host}' --hosts ...``: one
limit per host, each of ``--gpus`` slots; every worker then sets
``EMBEDDER_HOST`` to its name, and runs use ``gpu.concurrency_limit_name =
"gpu-{host}"``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.actions import WorkPoolCreate  # noqa: E402
from prefect.exceptions import ObjectAlreadyExists  # noqa: E402


def setup(pool: str = "embedding", limit_name: str = "gpu", gpus: int = 1, pool_concurrency: int = 4,
          hosts: list[str] | None = None) -> dict[str, Any]:
    """Create (or update) the pool and the limit(s); return what exists afterwards.

    Args:
        limit_name: The limit, or a template with ``{host}`` (then ``hosts`` names the hosts).
        gpus: Slots of each limit.
        hosts: One limit per host, from ``limit_name``'s ``{host}``.
    """
    from embedder.settings import resolve_limit_name

    if gpus < 1:
        raise ValueError("--gpus must be at least 1")
    if ("{host}" in limit_name) != bool(hosts):
        raise ValueError("a per-host limit needs both --limit-name with '{host}' and --hosts")
    names = [resolve_limit_name(limit_name, host=h) for h in hosts] if hosts else [resolve_limit_name(limit_name)]
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", concurrency_limit=pool_concurrency))
            created_pool = True
        except ObjectAlreadyExists:
            created_pool = False
        limits = {}
        for name in names:
            client.upsert_global_concurrency_limit_by_name(name, gpus)
            limits[name] = client.read_global_concurrency_limit_by_name(name).limit
        work_pool = client.read_work_pool(pool)
    return {"pool": work_pool.name, "pool_type": work_pool.type, "pool_created": created_pool,
            "limit": names[0], "limit_slots": limits[names[0]], "limits": limits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="embedding")
    parser.add_argument("--limit-name", default="gpu")
    parser.add_argument("--gpus", type=int, default=1, help="slots of the GPU limit (number of GPUs)")
    parser.add_argument("--pool-concurrency", type=int, default=4,
                        help="flow runs at once across the pool (a parent run holds one while its collections run)")
    parser.add_argument("--hosts", default="", help="comma-separated host names: one limit per host")
    args = parser.parse_args()
    hosts = [h for h in args.hosts.split(",") if h]
    result = setup(args.pool, args.limit_name, args.gpus, args.pool_concurrency, hosts or None)
    limits = ", ".join(f"{name!r} = {slots} slot(s)" for name, slots in result["limits"].items())
    print(f"work pool {result['pool']!r} ({result['pool_type']}){' created' if result['pool_created'] else ''}; "
          f"global concurrency limit(s) {limits}")
    print(f"before `prefect worker start --pool {args.pool}`: export EMBEDDER_PROJECT_DIR={ROOT}")


if __name__ == "__main__":
    main()
