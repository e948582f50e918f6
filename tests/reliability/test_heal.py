"""Damaged vector-store parts, as a disk error or a stray process leaves them: the next run sets the part
aside, embeds its vectors again, says so, and its exports equal a clean run's."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedder.io.writers import read_jsonl_records
from embedder.settings import CollectionInput, RunConfig
from tests.conftest import SCIFACT

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

N = 20


def _docs(path: Path, n: int) -> Path:
    with open(SCIFACT / "corpus.jsonl") as src, open(path, "w") as dst:
        for line in itertools.islice(src, n):
            doc = json.loads(line)
            dst.write(json.dumps({"id": doc["_id"], "text": f"{doc['title']}. {doc['text']}"}) + "\n")
    return path


def _config(data: Path, out: Path) -> RunConfig:
    return RunConfig(collections=[CollectionInput(name="heal", path=str(data))], output_dir=str(out),
                     local_files_only=True, rerank={"enabled": False})


def _run(config: RunConfig):  # noqa: ANN202
    from flows.embed_collections import embed_collections

    [summary] = embed_collections(config)
    return summary


def _parts(out: Path, kind: str) -> list[Path]:
    parts = sorted((out / "heal" / ".stages" / "vectors").glob("*/part-*.parquet"))
    column = "vector" if kind == "dense" else "indices"
    return [p for p in parts if column in pq.read_schema(p).names]


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(7)
    if how == "flipped bytes":  # 8 bytes XORed inside the values: the file still opens
        at = len(data) // 2
        data[at:at + 8] = bytes(b ^ 0x5A for b in data[at:at + 8])
    elif how == "truncated":
        data = data[:len(data) // 2]
    elif how == "random bytes":
        data = bytearray(rng.integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif how == "garbage in the middle":
        at = len(data) // 3
        data[at:at + 4096] = rng.integers(0, 256, min(4096, len(data) - at), dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean run over the edited input (one chunk more), to compare the healed runs with."""
    tmp = tmp_path_factory.mktemp("clean")
    out = tmp / "out"
    assert _run(_config(_docs(tmp / "docs.jsonl", N + 1), out)).status == "completed"
    return out / "heal"


@pytest.mark.parametrize(("kind", "how"), [("dense", "flipped bytes"), ("dense", "truncated"),
                                           ("dense", "garbage in the middle"), ("sparse", "flipped bytes"),
                                           ("sparse", "random bytes")])
def test_a_damaged_part_is_set_aside_its_vectors_recomputed_and_the_exports_equal_a_clean_runs(
        kind, how, clean, tmp_path):
    out = tmp_path / "out"
    assert _run(_config(_docs(tmp_path / "docs.jsonl", N), out)).status == "completed"
    [part] = _parts(out, kind)
    _damage(part, how)

    # The nightly re-run: one chunk added, so the stages run and read the store.
    summary = _run(_config(_docs(tmp_path / "docs.jsonl", N + 1), out))
    assert summary.status == "completed", summary.warnings
    assert summary.integrity is not None and summary.integrity.damaged == 1, summary.integrity
    [q] = summary.integrity.quarantined
    # Set aside as a stage directory is: its name, then when and by which process.
    assert q["stage"] == kind and Path(q["file"]).name.startswith(part.name + ".") and Path(q["file"]).exists()
    assert ".stages/quarantine/" in q["file"] and Path(q["file"] + ".reason.txt").exists()
    assert not part.exists()
    assert any("damaged vector-store part" in w and part.name in w for w in summary.warnings), summary.warnings
    run = summary.dense_run if kind == "dense" else summary.sparse_run
    if kind == "dense":
        assert run.total_embeddings_generated == N + 1 and run.reused == 0  # everything the part held, again

    healed = out / "heal"
    a, b = pq.read_table(healed / "dense.parquet"), pq.read_table(clean / "dense.parquet")
    assert a["id"].to_pylist() == b["id"].to_pylist()
    va, vb = np.stack(a["vector"].to_numpy(zero_copy_only=False)), np.stack(b["vector"].to_numpy(zero_copy_only=False))
    assert np.allclose(va, vb, atol=1e-5) and np.allclose(np.linalg.norm(va, axis=1), 1.0, atol=1e-4)
    sa, sb = read_jsonl_records(healed / "sparse.jsonl"), read_jsonl_records(clean / "sparse.jsonl")
    assert [r["sparse_vector"] for r in sa] == [r["sparse_vector"] for r in sb]
    assert summary.index_run.points_count == N + 1

    # And after the heal, nothing is damaged any more.
    again = _run(_config(_docs(tmp_path / "docs.jsonl", N + 2), out))
    assert again.status == "completed" and again.integrity.damaged == 0 and again.integrity.files_checked >= 1
    assert again.dense_run.total_embeddings_generated == 1


def test_an_old_part_without_page_checksums_is_still_caught_by_its_vectors(tmp_path):
    """Parts written before checksums: a flipped value shows as a vector that is no longer of unit length."""
    out = tmp_path / "out"
    assert _run(_config(_docs(tmp_path / "docs.jsonl", N), out)).status == "completed"
    [part] = _parts(out, "dense")
    table = pq.read_table(part)
    vectors = np.stack(table["vector"].to_numpy(zero_copy_only=False)).copy()
    vectors[3, 7] = 263.5  # as a damaged float looks
    import pyarrow as pa

    damaged = table.set_column(1, "vector", pa.FixedSizeListArray.from_arrays(
        pa.array(vectors.reshape(-1), type=pa.float32()), vectors.shape[1]))
    pq.write_table(damaged, part)  # no page checksums, as the earlier writer made them
    os.utime(part)
    summary = _run(_config(_docs(tmp_path / "docs.jsonl", N + 1), out))
    assert summary.status == "completed" and summary.integrity.damaged == 1
    norms = np.linalg.norm(np.stack(pq.read_table(out / "heal" / "dense.parquet")["vector"].to_numpy(
        zero_copy_only=False)), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-4), norms.max()


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_a_damaged_part_under_a_cached_stage_is_healed_by_the_unchanged_rerun(kind, tmp_path):
    """The nightly re-run with nothing changed serves every stage from cache, so it reads no vector:
    the parts those results stand on are scrubbed all the same, and a damaged one is set aside and
    its vectors embedded again, so ``verify`` finds nothing after the run."""
    from embedder.verify import verify_collection

    out = tmp_path / "out"
    config = _config(_docs(tmp_path / "docs.jsonl", N), out)
    first = _run(config)
    assert first.status == "completed"
    before = pq.read_table(out / "heal" / "dense.parquet")
    [part] = _parts(out, kind)
    _damage(part, "flipped bytes")
    assert [f.kind for f in verify_collection(out, "heal").damaged] == ["vector part"]

    summary = _run(config)
    assert summary.status == "completed", summary.warnings
    assert summary.integrity.damaged == 1, summary.integrity
    [q] = summary.integrity.quarantined
    assert q["stage"] == kind and Path(q["file"]).exists() and not part.exists()
    assert any("under its stored result" in w and "embedded its vectors again" in w for w in summary.warnings), \
        summary.warnings
    # Everything the part held (the whole collection here) came from the model again.
    reused = summary.dense_run.reused if kind == "dense" else sum(summary.sparse_run.reused.values())
    assert reused == 0
    assert verify_collection(out, "heal").damaged == []
    after = pq.read_table(out / "heal" / "dense.parquet")
    assert after["id"].to_pylist() == before["id"].to_pylist()
    assert np.allclose(np.stack(after["vector"].to_numpy(zero_copy_only=False)),
                       np.stack(before["vector"].to_numpy(zero_copy_only=False)), atol=1e-5)

    # The run after the heal reuses everything and finds nothing to heal.
    again = _run(config)
    assert again.status == "completed" and again.integrity.damaged == 0
    assert again.dense_run.total_embeddings_generated == 0
