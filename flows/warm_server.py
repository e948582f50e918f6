"""A Prefect server kept running between CLI runs, so a nightly run does not pay for starting one.

Without ``PREFECT_API_URL`` every ``embed-collections run`` starts a temporary
Prefect server and stops it at the end: 6 s of an unchanged re-run of the
sample here (17 s on a new Prefect home), more than the flow itself.
``embed-collections server start`` starts ``prefect server start`` (through
:mod:`flows.prefect_server`, so SQLite writes queue instead of failing) on a free
loopback port, detached, with the caller's ``PREFECT_HOME``, and records it in
``$PREFECT_HOME/embedder-server.json``. Each run in that Prefect home finds the
record, checks that its process is alive and that its API answers, and uses it
instead of a temporary server (its runs show in that server's UI). A record
whose server is gone or does not answer is ignored (and removed by
``server status``): the run starts a temporary server as before.
``embed-collections server stop`` stops it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedder.io.atomic import atomic_write_text
from embedder.procs import owner_dead, pid_start_time

RECORD = "embedder-server.json"
LOG = "embedder-server.log"
# How long a run waits for the recorded server's health check before it starts its own.
HEALTH_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class WarmServer:
    """A recorded server: its API URL and its process."""

    url: str
    pid: int
    started: int | None
    host: str

    def owner(self) -> dict[str, object]:
        """The record's owner fields, as :func:`embedder.procs.owner_dead` reads them."""
        return {"pid": self.pid, "host": self.host, "started": self.started}


def prefect_home() -> Path:
    """The Prefect home a run in this environment uses (``PREFECT_HOME``, else Prefect's default)."""
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def read_record(home: Path | None = None) -> WarmServer | None:
    """The recorded server of ``home``, or None when there is no readable record."""
    path = (home or prefect_home()) / RECORD
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return WarmServer(url=str(data["url"]), pid=int(data["pid"]), started=data.get("started"),
                          host=str(data["host"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def healthy(url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    """Whether a Prefect API answers its health check at ``url``."""
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def usable(home: Path | None = None) -> WarmServer | None:
    """The recorded server when its process is alive and its API answers; None otherwise."""
    record = read_record(home)
    if record is None or record.host != socket.gethostname() or owner_dead(record.owner()):
        return None
    return record if healthy(record.url) else None


def use_warm_server() -> str | None:
    """Point this process at the warm server of its Prefect home, when one answers; return its URL.

    Must run before Prefect is imported (its settings are read once). Nothing
    changes when ``PREFECT_API_URL`` is already set.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    record = usable()
    if record is None:
        return None
    os.environ["PREFECT_API_URL"] = record.url
    return record.url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start(timeout_s: float = 300.0) -> tuple[WarmServer, bool]:
    """Start the warm server of this Prefect home, or find the one running; return it and whether it is new.

    Raises:
        RuntimeError: The server exited or did not answer within ``timeout_s``, with the end of its log.
    """
    home = prefect_home()
    running = usable(home)
    if running is not None:
        return running, False
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": url}
    env.pop("PREFECT_API_URL", None)
    # A 503 a client had to retry is named in the server's log, with its cause.
    env.setdefault("PREFECT_API_LOG_RETRYABLE_ERRORS", "true")
    with open(home / LOG, "w", encoding="utf-8") as log:
        # Its own session: the server outlives this command and a Ctrl-C in the shell that started it.
        # flows.prefect_server is `prefect server start` with SQLite writes that queue instead of failing.
        proc = subprocess.Popen([sys.executable, "-m", "flows.prefect_server", "server", "start", "--host",
                                 "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    record = WarmServer(url=url, pid=proc.pid, started=pid_start_time(proc.pid), host=socket.gethostname())
    deadline = time.monotonic() + timeout_s
    while not healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc.pid)
            tail = (home / LOG).read_text(encoding="utf-8", errors="replace")[-2000:]
            raise RuntimeError(f"the Prefect server did not start (see {home / LOG}): {tail}")
        time.sleep(0.5)
    atomic_write_text(home / RECORD, json.dumps({"url": record.url, "pid": record.pid, "started": record.started,
                                                 "host": record.host}))
    return record, True


def stop_group(pid: int, grace_s: float = 30.0) -> None:
    """SIGTERM the process group of ``pid`` (a detached server or runner and its children), SIGKILL later."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_recorded(path: Path, owner: dict[str, Any]) -> None:
    """Stop the process group of a record's owner (when it is alive on this host), then remove the record."""
    if owner.get("host") == socket.gethostname() and not owner_dead(owner):
        stop_group(int(owner["pid"]))
    path.unlink(missing_ok=True)


def stop() -> WarmServer | None:
    """Stop the warm server of this Prefect home (its whole process group); return what was stopped."""
    home = prefect_home()
    record = read_record(home)
    if record is not None:
        stop_recorded(home / RECORD, record.owner())
    return record


def status() -> tuple[WarmServer | None, str]:
    """The warm server of this Prefect home and a line about it; a stale record is removed."""
    home = prefect_home()
    record = read_record(home)
    if record is None:
        return None, f"no warm server in {home}: each run starts a temporary one"
    if usable(home) is not None:
        return record, f"warm server at {record.url} (pid {record.pid}); runs in {home} use it"
    if record.host == socket.gethostname() and owner_dead(record.owner()):
        (home / RECORD).unlink(missing_ok=True)
        return None, f"the warm server recorded in {home} (pid {record.pid}) is gone; its record was removed"
    return None, f"the warm server recorded in {home} at {record.url} does not answer; runs start a temporary one"
