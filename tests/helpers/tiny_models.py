"""Tiny real models built offline for tests: a trained 2-layer BERT CrossEncoder."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "apple river stone cloud engine garden silver forest rocket planet ocean violin candle bridge tiger "
    "winter castle meadow harbor lantern desert falcon copper island thunder marble pepper glacier "
    "orchard compass velvet canyon beacon saddle walnut comet anchor prairie quartz willow harvest "
    "raven summit ember lagoon piano cedar tunnel maple crystal badger meteor valley timber coral "
    "feather kettle mirror needle oyster pebble quiver ribbon shadow spruce trumpet umbrella vessel "
    "wagon yarn zephyr acorn basalt cobalt dagger eagle fossil goblet hazel iguana jasper kiwi lotus"
).split()


TOPICS = [WORDS[i:i + 11] for i in range(0, 77, 11)]


def _pair(rng: random.Random) -> tuple[str, str, str]:
    # Relevant documents repeat the query's words among words of the same topic;
    # irrelevant ones come from another topic, so they share no word with the query.
    a, b = rng.sample(range(len(TOPICS)), 2)
    query = rng.sample(TOPICS[a], 3)
    relevant = query + rng.sample([w for w in TOPICS[a] if w not in query], 5)
    rng.shuffle(relevant)
    irrelevant = rng.sample(TOPICS[b], 8)
    return " ".join(query), " ".join(relevant), " ".join(irrelevant)


def build_tiny_cross_encoder(out_dir: Path, *, steps: int = 600, seed: int = 0, max_steps: int = 3000) -> Path:
    """Train a WordPiece tokenizer and a 2-layer BERT (num_labels=1) on word-overlap pairs.

    After training, a document sharing the query's words scores above one that
    does not: a real relevance signal, learned, not hard-coded. Trained on one
    thread, so the weights are the same whatever else the test process did
    (300 steps left held-out margins near 0.06, flipping with thread count;
    600 steps leave them near 1 here). Float kernels differ between CPUs, so
    the same seed need not give the same weights on another machine: training
    goes on, 200 steps at a time up to ``max_steps``, until every pair of a
    validation set (drawn apart from :func:`relevance_pairs`) is ranked right
    with a clear margin, and raises if it never is.
    """
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials)
    tok.train_from_iterator([" ".join(WORDS)] * 10, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128, num_labels=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    vrng = random.Random(f"validation-{seed}")
    validation = [_pair(vrng) for _ in range(200)]
    done, margin = 0, float("-inf")
    try:
        while True:
            model.train()
            _train(model, fast, opt, loss_fn, rng, steps if done == 0 else 200)
            done += steps if done == 0 else 200
            margin = _min_margin(model, fast, validation)
            if margin > 0.5 or done >= max_steps:
                break
    finally:
        torch.set_num_threads(threads)
    if margin <= 0.5:
        raise RuntimeError(f"the tiny cross-encoder did not learn in {done} steps (min validation margin {margin:.3f})")
    model.eval()
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def _train(model, fast, opt, loss_fn, rng: random.Random, steps: int) -> None:  # noqa: ANN001 - torch objects
    import torch

    for _ in range(steps):
        queries, docs, labels = [], [], []
        for _ in range(16):
            q, rel, irr = _pair(rng)
            queries += [q, q]
            docs += [rel, irr]
            labels += [1.0, 0.0]
        batch = fast(queries, docs, padding=True, truncation=True, return_tensors="pt")
        logits = model(**batch).logits.squeeze(-1)
        loss = loss_fn(logits, torch.tensor(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _min_margin(model, fast, triples: list[tuple[str, str, str]]) -> float:  # noqa: ANN001 - torch objects
    """Smallest score(relevant) - score(irrelevant) over the triples."""
    import torch

    model.eval()
    queries = [q for q, _, _ in triples]
    with torch.no_grad():
        rel = model(**fast(queries, [r for _, r, _ in triples], padding=True, return_tensors="pt")).logits.squeeze(-1)
        irr = model(**fast(queries, [i for _, _, i in triples], padding=True, return_tensors="pt")).logits.squeeze(-1)
    # In probability, as CrossEncoder.predict reports them (a sigmoid over the one logit).
    return float((torch.sigmoid(rel) - torch.sigmoid(irr)).min())


def relevance_pairs(n: int, seed: int = 99) -> list[tuple[str, str, str]]:
    """Held-out (query, relevant, irrelevant) triples."""
    rng = random.Random(seed)
    return [_pair(rng) for _ in range(n)]
