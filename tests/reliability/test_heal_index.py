"""A damaged published index, as a disk error, a stray process or a crash leaves it.

Search refuses to serve it (a clear error naming the fix), ``verify`` names it,
and the next run rebuilds it from the stored vectors (embedding nothing): the
run ends ``completed``, says what it healed, and search answers as before the damage.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedder.errors import VectorIndexError
from tests.conftest import SAMPLE_DIR
from tests.helpers.homes import cli_env
from tests.helpers.sample_runs import answers, run_one, sample_config
from tests.helpers.wrapped_cli import run_until_killed

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

def _dense(out: Path) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(out / "sample" / "dense.parquet")
    return table["id"].to_pylist(), np.stack(table["vector"].to_numpy(zero_copy_only=False))


def _copy(baseline_out: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(baseline_out, out, symlinks=True)
    return out


def _shard(out: Path) -> Path:
    from embedder.io.edge_store import EdgeStore

    return EdgeStore(out).shard_dir("sample")


def _one(shard: Path, pattern: str) -> Path:
    [path] = sorted(shard.glob(pattern))[:1]
    return path


def _damage(shard: Path, what: str, out: Path) -> Path:
    rng = np.random.default_rng(3)
    if what == "index manifest garbage":
        path = out / "sample" / "current" / "index.json"
        path.write_bytes(b'{"format": 1, "shard": ' + bytes(rng.integers(0, 256, 64, dtype=np.uint8)))
        return path
    targets = {
        "vector file, first MiB random": "segments/*/vector_storage-dense/vectors/chunk_0.mmap",
        "vector file truncated": "segments/*/vector_storage-dense/vectors/chunk_0.mmap",
        "id tracker garbage": "segments/*/*id_tracker*",
        "segment.json garbage": "segments/*/segment.json",
        "payload page missing": "segments/*/payload_storage/page_0.dat",
        "checksum manifest garbage": "checksums.json",
    }
    path = _one(shard, targets[what])
    data = bytearray(path.read_bytes())
    if what.endswith("first MiB random"):
        data[: 1 << 20] = rng.integers(0, 256, min(len(data), 1 << 20), dtype=np.uint8).tobytes()
    elif what.endswith("truncated"):
        data = data[: len(data) // 2]
    elif what.endswith("missing"):
        path.unlink()
        return path
    else:  # garbage over the middle
        at = len(data) // 3
        data[at:at + 4096] = rng.integers(0, 256, min(4096, len(data) - at), dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("what", ["vector file, first MiB random", "vector file truncated", "id tracker garbage",
                                  "segment.json garbage", "payload page missing", "checksum manifest garbage",
                                  "index manifest garbage"])
def test_a_damaged_index_is_refused_reported_and_rebuilt_from_the_stored_vectors(what, clean_sample_run, tmp_path):
    from embedder.verify import verify_collection

    clean_out, clean_answers = clean_sample_run
    out = _copy(clean_out, tmp_path)
    shard = _shard(out)
    damaged = _damage(shard, what, out)

    # Nothing wrong is served: search refuses with the fix, and a full scrub names the file.
    with pytest.raises(VectorIndexError, match="embed-collections run"):
        answers(out)
    report = verify_collection(out, "sample")
    [index] = [f for f in report.damaged if f.kind == "index"]
    assert Path(index.path).name == damaged.name
    # The manifest lies in the run set, which is sealed too: its scrub names it a second time.
    assert [f.kind for f in report.damaged] == ["index"] + (["run set"] if damaged.name == "index.json" else [])

    summary = run_one(sample_config(out))
    assert summary.status == "completed", summary.warnings
    assert summary.index_run.action == "rebuilt" and summary.index_run.points_count == 50
    assert summary.dense_run.total_embeddings_generated == 0  # rebuilt from the stored vectors
    assert summary.integrity.damaged >= 1 and [r["what"] for r in summary.integrity.rebuilt] == ["index"]
    assert summary.integrity.rebuilt[0]["build"] == summary.index_run.build_id != shard.name
    assert any("rebuilt from the stored vectors" in w for w in summary.warnings), summary.warnings

    assert answers(out) == clean_answers
    assert verify_collection(out, "sample").damaged == []
    ids, vectors = _dense(out)
    clean_ids, clean_vectors = _dense(clean_out)
    assert ids == clean_ids and np.allclose(vectors, clean_vectors, atol=1e-6)


def test_vectors_that_passed_their_checksums_but_differ_are_caught_by_the_read_back(clean_sample_run, tmp_path):
    """Damage before the seal (a bad write the checksums then recorded): only reading the points back shows it."""
    from embedder.io.integrity import write_checksums

    clean_out, clean_answers = clean_sample_run
    out = _copy(clean_out, tmp_path)
    shard = _shard(out)
    path = _one(shard, "segments/*/vector_storage-dense/vectors/chunk_0.mmap")
    with open(path, "r+b") as fh:  # the third stored vector, scaled: still finite, no longer the stored one
        fh.seek(2 * 384 * 4)
        row = np.frombuffer(fh.read(384 * 4), dtype=np.float32).copy()
        row[:64] = -row[:64]
        fh.seek(2 * 384 * 4)
        fh.write(row.tobytes())
    write_checksums(shard)

    summary = run_one(sample_config(out))  # nothing changed in the input: an "unchanged" run, but it reads points back
    assert summary.status == "completed"
    assert summary.index_run.action == "rebuilt"
    damage = summary.index_run.integrity.damaged
    assert any("1 of 50 points read back from the index differ" in d["reason"] for d in damage), damage
    assert summary.index_run.integrity.proof.model_dump() == {"sampled": 50, "mismatched": 0}  # the new build
    assert answers(out) == clean_answers


# The real CLI, killed by SIGKILL right after the index stage's first write into its new shard.
KILL_IN_INDEX_BUILD = """
import os, signal, sys
from embedder.io import edge_store
real = edge_store.EdgeIndexWriter.upsert
def upsert(self, batch):
    n = real(self, batch)
    print("KILLING IN INDEX BUILD", self.path, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
edge_store.EdgeIndexWriter.upsert = upsert
from flows.cli import main
sys.argv = ["embed-collections", *sys.argv[1:]]
main()
"""


def test_sigkill_during_the_shard_build_serves_the_old_index_and_the_next_run_cleans_up(clean_sample_run, tmp_path):
    clean_out, clean_answers = clean_sample_run
    out = _copy(clean_out, tmp_path)
    edited = tmp_path / "edited"
    shutil.copytree(SAMPLE_DIR, edited)
    chunks = json.loads((edited / "tides_chunks.json").read_text())
    chunks[0]["text"] += " Spring tides follow the new and the full moon."
    (edited / "tides_chunks.json").write_text(json.dumps(chunks))
    env = cli_env(tmp_path / "home")
    killed = run_until_killed(KILL_IN_INDEX_BUILD, ["run", "--input", str(edited), "--collection", "sample",
                                                    "--output-dir", str(out), "--local-files-only",
                                                    "--disable-rerank"], env, tmp_path / "crash.log")
    assert killed == -signal.SIGKILL, (tmp_path / "crash.log").read_text()[-3000:]
    shards = out / "sample" / "index" / "shards"
    leftovers = {p.name for p in shards.iterdir() if p.is_dir()} - {_shard(out).name}
    assert leftovers and all((shards / f"{name}.building").exists() for name in leftovers)

    assert answers(out) == clean_answers  # the killed build never reached readers
    summary = run_one(sample_config(out, edited))
    assert summary.status == "completed" and summary.index_run.action == "incremental"
    assert not any((shards / name).exists() or (shards / f"{name}.building").exists() for name in leftovers)
    back = run_one(sample_config(out))  # and back to the original input: the answers are the clean run's again
    assert back.status == "completed" and answers(out) == clean_answers
