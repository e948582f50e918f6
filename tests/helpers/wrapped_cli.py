"""The real CLI as a ``python -c`` script, with a fault injected before each dense forward pass."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO


def cli_with_dense_hook(body: str) -> str:
    """A script that runs ``embed-collections`` with ``body`` executed before every dense forward pass.

    ``body`` sees ``calls[0]`` (the passes so far, this one included) and the modules
    ``os``, ``signal`` and ``time``; the script takes the CLI's arguments.
    """
    return f"""
import os, signal, sys, time
import embedder.models.dense as dense_mod
real, calls = dense_mod.dense_forward, [0]
def hooked(model):
    forward = real(model)
    def run(features):
        calls[0] += 1
{textwrap.indent(textwrap.dedent(body).strip(), " " * 8)}
        return forward(features)
    return run
dense_mod.dense_forward = hooked
from flows.cli import main
sys.argv = ["embed-collections", *sys.argv[1:]]
main()
"""


def run_until_killed(script: str, args: list[str], env: dict[str, str], log_path: Path,
                     timeout_s: float = 400) -> int:
    """Run ``python -c script *args`` (a CLI that kills itself) to its end; return its exit status.

    Its process group is killed afterwards: the temporary Prefect server outlives a SIGKILLed CLI.
    """
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", script, *args], env=env, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
