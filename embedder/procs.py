"""Who owns a marker or a lease: this process's identity, and whether a recorded owner is provably dead.

A record names its owner by host, pid and the pid's start time, so a pid that
the kernel reused for another process does not pass for the owner. An owner on
another host is never judged: only its host can tell whether it is alive.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stat_fields(pid: int | str) -> list[str]:
    """Fields 3 onwards of ``/proc/<pid>/stat`` (Linux), or [] where unknown."""
    try:
        stat = open(f"/proc/{pid}/stat", encoding="ascii", errors="replace").read()
    except OSError:
        return []
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return stat[stat.rfind(")") + 2:].split()


def pid_start_time(pid: int) -> int | None:
    """The pid's start time in clock ticks since boot (Linux ``/proc``), or None where unknown."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19])  # field 22 overall
    except (IndexError, ValueError):
        return None


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(entry.name)
        if len(fields) > 1 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(entry.name))  # field 4 overall: the parent
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def owner() -> dict[str, Any]:
    """This process as a record's owner: ``{"pid", "host", "started"}``."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": pid_start_time(pid)}


def owner_dead(record: dict[str, Any]) -> bool:
    """True only when the recorded owner is on this host and its process is gone (or the pid was reused)."""
    if record.get("host") != socket.gethostname():
        return False
    try:
        pid = int(record.get("pid", 0))
    except (TypeError, ValueError):
        return False
    if not pid_alive(pid):
        return True
    started = record.get("started")
    now = pid_start_time(pid)
    return started is not None and now is not None and int(started) != now
