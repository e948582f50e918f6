"""The simplest runner: serve every deployment the flows need from this process, schedules active.

Usage (from the project root, against a running server):
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python deployments/serve.py

`prefect.serve` needs no work pool; each run executes in a subprocess of this
one. It serves `nightly` (cron 02:00 UTC), `manual` (the UI's run form) and
`collection`, the per-collection flow a run fans its collections out to
(``orchestration.collection_fanout = "auto"``), so a served run behaves as a worker's does.
SIGTERM or SIGINT stops it: runs in flight are cancelled, schedules paused.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prefect.runner import Runner  # noqa: E402

from flows.embed_collections import embed_collection, embed_collections  # noqa: E402
from tasks.lease import use_shared_lease_storage  # noqa: E402


def build_deployments() -> list[Any]:
    """`nightly`, `manual` and `collection`, as prefect.yaml defines them."""
    nightly = embed_collections.to_deployment(
        name="nightly", cron="0 2 * * *", tags=["embedding", "gpu", "nightly"],
        parameters={"config_file": str(ROOT / "deployments" / "nightly.toml")},
        description="Re-embed the collections listed in deployments/nightly.toml every night.",
    )
    manual = embed_collections.to_deployment(
        name="manual", tags=["embedding", "gpu", "manual"],
        description="On-demand runs from the Prefect UI's parameter form (no schedule).",
    )
    collection = embed_collection.to_deployment(
        name="collection", tags=["embedding", "gpu", "collection"],
        description="One collection of a nightly or manual run (submitted by the parent run; not run by hand).",
    )
    return [nightly, manual, collection]


class _Runner(Runner):
    """Prefect's runner, stopping promptly at SIGTERM and at Ctrl-C.

    Prefect's own SIGTERM handler runs its shutdown on another event loop and
    blocks on it, so the signal went unanswered while a run was in flight. Here
    the first SIGTERM or SIGINT schedules the runner's shutdown on its own loop:
    its runs in flight are cancelled (their flow runs end Cancelled), the poll
    loop stops and the schedules are paused. A second signal stops at once.
    """

    _stop_requested = False

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        """Stop: cancel the runs in flight, stop polling, pause the schedules."""
        if self._stop_requested or self._loop is None:
            raise KeyboardInterrupt("stopped at once")
        self._stop_requested = True
        self._logger.info("stopping: cancelling the runs in flight (again to stop at once)")
        loop = self._loop
        loop.call_soon_threadsafe(lambda: loop.create_task(self.astop()))


def main() -> None:
    """Serve until SIGTERM or SIGINT."""
    use_shared_lease_storage()  # the served runs inherit it, should this serve on the ephemeral server
    runner = _Runner(pause_on_shutdown=True)
    for deployment in build_deployments():
        runner.add_deployment(deployment)
    # asyncio.run keeps a SIGINT handler that is not Python's default: Ctrl-C stops like SIGTERM.
    signal.signal(signal.SIGINT, runner.handle_sigterm)
    print("serving nightly, manual and collection; SIGTERM or Ctrl-C stops", flush=True)
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt as exc:
        print(f"stopped ({exc})", flush=True)


if __name__ == "__main__":
    main()
