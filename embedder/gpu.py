"""Device resolution, the GPU memory ceiling, peak-memory measurement and exclusive placement.

Everything degrades cleanly to the CPU: no CUDA means ``device="cpu"`` and a
peak of 0.0 GB; no NVML means torch's own counters only.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

_GB = 1024**3


def resolve_device(force_cpu: bool = False) -> str:
    """``cuda`` when a GPU is usable and not ``force_cpu``, else ``cpu``."""
    if not force_cpu and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def apply_memory_ceiling(device: str, ceiling_gb: float) -> float | None:
    """Cap this process's CUDA allocations at ``ceiling_gb``.

    Returns:
        The fraction applied, or None on the CPU.
    """
    if not device.startswith("cuda"):
        return None
    index = torch.device(device).index or 0
    total = torch.cuda.get_device_properties(index).total_memory / _GB
    fraction = min(1.0, ceiling_gb / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def _nvml_used_gb(index: int) -> float | None:
    try:
        import pynvml  # provided by nvidia-ml-py

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return float(pynvml.nvmlDeviceGetMemoryInfo(handle).used) / _GB
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no NVML library, or no permission: torch's counters still work
        return None


def process_peak_rss_gb() -> float:
    """Peak resident memory of this process (ru_maxrss), in GB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / _GB if sys.platform == "darwin" else peak * 1024 / _GB


@dataclass
class PeakMeter:
    """Measures the peak GPU memory of one stage."""

    device: str
    nvml_peak_gb: float = 0.0
    _started: bool = field(default=False, repr=False)

    def start(self) -> None:
        """Reset torch's peak counter for this stage."""
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(torch.device(self.device))
        self._started = True

    def sample(self) -> None:
        """Take an NVML reading (device-wide usage, other processes included)."""
        if self.device.startswith("cuda"):
            used = _nvml_used_gb(torch.device(self.device).index or 0)
            if used is not None:
                self.nvml_peak_gb = max(self.nvml_peak_gb, used)

    def peak_gb(self) -> float:
        """Peak bytes allocated by torch since :meth:`start`, in GB (0.0 on the CPU)."""
        if not self.device.startswith("cuda"):
            return 0.0
        return float(torch.cuda.max_memory_allocated(torch.device(self.device))) / _GB


def free_device_cache(device: str) -> None:
    """Return cached blocks to the driver so the next stage (or process) can use them."""
    gc.collect()
    if device.startswith("cuda"):
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
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def plan_batch_size(
    device: str,
    ceiling_gb: float,
    *,
    per_item_mb: float,
    model_gb: float,
    cpu_default: int,
    floor: int = 1,
    cap: int = 1024,
) -> int:
    """Pick a batch size that fits under the memory ceiling.

    On the GPU, the budget is the ceiling (bounded by the device's free memory)
    minus the model's weights, with 30% headroom for the allocator; each item
    costs ``per_item_mb`` of activations. On the CPU, ``cpu_default``.
    """
    if not device.startswith("cuda"):
        return max(floor, min(cap, cpu_default))
    index = torch.device(device).index or 0
    free_b, _total = torch.cuda.mem_get_info(index)
    budget_gb = min(ceiling_gb, free_b / _GB) - model_gb
    usable_mb = max(0.0, budget_gb * 0.7 * 1024)
    size = int(usable_mb // max(per_item_mb, 1e-3))
    # Powers of two keep kernels on their fast paths.
    size = 1 << max(0, size.bit_length() - 1) if size > 0 else floor
    return max(floor, min(cap, size))
