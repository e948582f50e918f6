"""The real CLI as a ``python -c`` script, with a fault injected before each dense forward pass."""

from __future__ import annotations

import textwrap


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
