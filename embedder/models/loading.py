"""One lock around every transformers model construction in the process.

transformers builds a model's modules on the meta device under a process-wide
default-device context, then fills in the weights. Two threads constructing
models at once (the sparse stage runs beside the dense stage) see each other's
context: SPLADE-tiny failed with "Cannot copy out of meta tensor" while MiniLM
loaded on the other thread. A load takes seconds and happens once per process
and model, so serialising loads costs nothing a run can measure.
"""

from __future__ import annotations

import threading

LOAD_LOCK = threading.RLock()
