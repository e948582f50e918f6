"""Where a run's time goes before its first stage: the process's start, its imports, the Prefect server.

A nightly re-run that embeds nothing is mostly fixed cost, and none of it shows
in the stages' own figures. The entry points mark what they know (the CLI when
its command starts, and around the start of the temporary Prefect server); the
flow marks its own start; :func:`startup_telemetry` turns the marks into the
summary's ``telemetry.startup``. A mark is kept the first time only, so a
process that runs several flows reports the start of its first.
"""

from __future__ import annotations

import os
import time

from embedder.procs import pid_start_time
from embedder.summary import StartupTelemetry

_MARKS: dict[str, float] = {}

# The events the entry points and the flow mark.
CLI = "cli"
SERVER_START = "server_start"
SERVER_READY = "server_ready"
FLOW = "flow"
# Marked by a child of the warm runner (flows.warm_runner): its process started when the runner forked it.
RUNNER = "runner"


def mark(event: str) -> None:
    """Note that ``event`` happened now (the first time only)."""
    _MARKS.setdefault(event, time.time())


def process_started_at() -> float | None:
    """When this process started (unix seconds, to the second), from ``/proc``; None where there is none."""
    ticks = pid_start_time(os.getpid())
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK") if ticks is not None else None


def _span(start: float | None, end: float | None) -> float | None:
    return round(max(0.0, end - start), 3) if start is not None and end is not None else None


def startup_telemetry(now: float | None = None) -> StartupTelemetry:
    """The fixed cost of this process's run up to ``now`` (default: now), from the marks made so far."""
    now = time.time() if now is None else now
    process = _MARKS.get(RUNNER) or process_started_at()
    flow = _MARKS.get(FLOW)
    return StartupTelemetry(
        process_to_flow_s=_span(process, flow),
        imports_s=_span(process, _MARKS.get(CLI)),
        server_start_s=_span(_MARKS.get(SERVER_START), _MARKS.get(SERVER_READY)),
        flow_s=_span(flow, now),
        warm_runner=RUNNER in _MARKS,
    )
