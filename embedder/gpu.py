"""Device resolution, the GPU memory ceiling, peak-memory measurement and exclusive placement.

Everything degrades cleanly to the CPU: no CUDA means ``device="cpu"`` and a
peak of 0.0 GB; no NVML means torch's own counters only.

torch is imported where it is first needed, not with this module: a re-run
with nothing to embed never loads a model, and importing torch alone cost it
over a second of CPU on every run.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import resource
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_GB = 1024**3


def resolve_device(force_cpu: bool = False) -> str:
    """``cuda`` when a GPU is usable and not ``force_cpu``, else ``cpu``."""
    if force_cpu:
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def apply_memory_ceiling(device: str, ceiling_gb: float) -> float | None:
    """Cap this process's device memory at ``ceiling_gb``, the CUDA context included.

    torch's allocator cap covers only its own allocations; the CUDA context
    (cuBLAS workspaces, kernels) lives outside it. So the cap is the ceiling
    minus the context this process measured (:func:`cuda_context_gb`), and the
    process as a whole stays under the ceiling as ``nvidia-smi`` sees it.

    Returns:
        The fraction of the device applied to torch's allocator, or None on the CPU.
    """
    if not device.startswith("cuda"):
        return None
    import torch

    index = torch.device(device).index or 0
    total = torch.cuda.get_device_properties(index).total_memory / _GB
    fraction = max(0.01, min(1.0, (ceiling_gb - cuda_context_gb(device)) / total))
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


_CONTEXT_GB: dict[int, float] = {}


def cuda_context_gb(device: str) -> float:
    """Device memory this process holds outside torch's allocator (the CUDA context), measured once per device.

    Initialises CUDA on ``device`` (safe outside the GPU lease: the context is a
    few hundred MB and no model is on the device yet). 0.0 on the CPU or where
    NVML cannot see this process.
    """
    if not device.startswith("cuda"):
        return 0.0
    import torch

    index = torch.device(device).index or 0
    if index not in _CONTEXT_GB:
        torch.cuda.init()  # type: ignore[no-untyped-call]
        with torch.cuda.device(index):
            torch.empty(1, device=device)  # the context exists from the first allocation
            torch.cuda.synchronize()
            used = _nvml_process_gb(index)
            _CONTEXT_GB[index] = max(0.0, used - torch.cuda.memory_reserved(index) / _GB) if used is not None else 0.0
    return _CONTEXT_GB[index]


def _nvml_process_gb(index: int) -> float | None:
    """This process's device memory on GPU ``index`` per NVML, or None when NVML cannot tell."""
    try:
        import pynvml  # provided by nvidia-ml-py

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            procs = list(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
            pid = os.getpid()
            mine = [p.usedGpuMemory for p in procs if p.pid == pid and p.usedGpuMemory is not None]
            # In a container NVML may list host pids only: then this process is not found.
            return float(sum(mine)) / _GB if mine else None
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no NVML library, or no permission
        return None


def process_peak_rss_gb() -> float:
    """Peak resident memory of this process (ru_maxrss), in GB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / _GB if sys.platform == "darwin" else peak * 1024 / _GB


@dataclass
class PeakMeter:
    """This process's device-memory peak through one stage, sampled on a thread.

    ``peak_gb`` is the device-level truth: NVML's figure for this process (CUDA
    context included), sampled every ``interval_s``; where NVML cannot see the
    process, torch's reserved peak plus the measured context. ``torch_peak_gb``
    is torch's allocated peak, a separate and smaller figure. Both are 0.0 on the CPU.
    """

    device: str
    interval_s: float = 0.05
    nvml_peak_gb: float = 0.0
    source: str = "none"
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def _cuda(self) -> bool:
        return self.device.startswith("cuda")

    def start(self) -> None:
        """Reset torch's peak counter and start sampling NVML."""
        if not self._cuda:
            return
        import torch

        torch.cuda.reset_peak_memory_stats(torch.device(self.device))
        self.sample()
        if self.source == "nvml" and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="device-memory", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Take one NVML reading of this process's device memory."""
        if not self._cuda:
            return
        import torch

        used = _nvml_process_gb(torch.device(self.device).index or 0)
        if used is not None:
            self.source = "nvml"
            self.nvml_peak_gb = max(self.nvml_peak_gb, used)

    def stop(self) -> None:
        """Stop sampling (after a last reading)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2)
            self._thread = None
        self.sample()

    def torch_peak_gb(self) -> float:
        """Peak bytes allocated by torch since :meth:`start`, in GB (0.0 on the CPU)."""
        if not self._cuda:
            return 0.0
        import torch

        return float(torch.cuda.max_memory_allocated(torch.device(self.device))) / _GB

    def peak_gb(self) -> float:
        """This process's device-memory peak since :meth:`start`, in GB (0.0 on the CPU)."""
        if not self._cuda:
            return 0.0
        if self.source == "nvml":
            return self.nvml_peak_gb
        import torch

        reserved = float(torch.cuda.max_memory_reserved(torch.device(self.device))) / _GB
        return reserved + cuda_context_gb(self.device)

    def memory_source(self) -> str:
        """Where :meth:`peak_gb` comes from: ``nvml``, ``torch-reserved+context`` or ``none`` (the CPU)."""
        if not self._cuda:
            return "none"
        return "nvml" if self.source == "nvml" else "torch-reserved+context"


def free_device_cache(device: str) -> None:
    """Return cached blocks to the driver so the next stage (or process) can use them.

    A no-op on the CPU: there is no cache to return, and a full ``gc.collect()``
    after every stage cost a third of a second each on a large heap.
    """
    if device.startswith("cuda"):
        import torch

        gc.collect()  # the model's dropped tensors must be unreachable before the cache can shrink
        torch.cuda.empty_cache()


@contextlib.contextmanager
def exclusive_device(model: Any, device: str) -> Iterator[Any]:
    """Hold ``model`` on ``device`` for one stage, then move it off and free the cache.

    This is the seed's "exclusive mode": one model at a time occupies the GPU.
    ``model`` is anything with ``.to(device)`` (a torch module, a
    SentenceTransformer, a CrossEncoder's inner model).
    """
    moved = device.startswith("cuda") and hasattr(model, "to")
    if moved:
        model.to(device)
    try:
        yield model
    finally:
        if moved:
            model.to("cpu")
        free_device_cache(device)


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error (including ones raised as plain RuntimeError)."""
    # A process that never imported torch cannot have raised torch's own OOM error.
    torch_mod = sys.modules.get("torch")
    oom_type = getattr(getattr(torch_mod, "cuda", None), "OutOfMemoryError", None)
    return (isinstance(oom_type, type) and isinstance(exc, oom_type)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )
