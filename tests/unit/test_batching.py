import pytest
import torch

from embedder.batching import BatchPlan, run_batched
from embedder.errors import StageError


def test_oom_halves_and_retries_until_it_fits():
    calls = []

    def fn(start, end):
        calls.append(end - start)
        if end - start > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return list(range(start, end))

    run = run_batched(40, fn, BatchPlan(size=32))
    assert run.outputs == list(range(40))
    assert run.backoffs == [32, 16]
    assert run.final_batch_size == 8
    assert calls[:3] == [32, 16, 8]


def test_oom_at_the_floor_is_a_clear_error():
    def fn(start, end):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(StageError, match="out of memory even at the minimum batch size 2"):
        run_batched(10, fn, BatchPlan(size=8, floor=2))


def test_other_errors_propagate_untouched():
    def fn(start, end):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_batched(3, fn, BatchPlan(size=2))
