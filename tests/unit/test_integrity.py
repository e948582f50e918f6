"""Checksums of kept files: what a quick check reads, what it catches, and what only a full check can."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from embedder.io.integrity import BLOCK, CHECKSUMS, check, check_dir, quarantine, read_checksums, write_checksums


@pytest.fixture
def sealed(tmp_path: Path) -> Path:
    root = tmp_path / "dir"
    (root / "sub").mkdir(parents=True)
    rng = random.Random(1)
    (root / "big.bin").write_bytes(rng.randbytes(5 * BLOCK + 123))
    (root / "sub" / "small.json").write_text('{"a": 1}')
    (root / ".hidden.tmp").write_text("not sealed")
    write_checksums(root)
    return root


def test_a_sealed_directory_checks_sound_quickly_and_in_full(sealed):
    manifest = read_checksums(sealed)
    assert set(manifest["files"]) == {"big.bin", "sub/small.json"}  # dot files are temp files, never sealed
    assert len(manifest["files"]["big.bin"]["xxh3"]) == 6
    quick = check(sealed, manifest, "quick", budget=0)
    assert quick.ok and quick.files_checked == 2 and quick.bytes_read == BLOCK + 123 + 8  # first and last blocks
    full = check_dir(sealed, "full")
    assert full is not None and full.ok and full.bytes_read == 5 * BLOCK + 123 + 8


@pytest.mark.parametrize("how", ["truncated", "first block", "last block", "missing", "grown"])
def test_a_quick_check_catches_what_a_disk_or_a_stray_process_does(sealed, how):
    path = sealed / "big.bin"
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "first block":
        data[10] ^= 0xFF
        path.write_bytes(data)
    elif how == "last block":
        data[-1] ^= 0xFF
        path.write_bytes(data)
    elif how == "missing":
        path.unlink()
    else:
        path.write_bytes(data + b"x")
    report = check(sealed, read_checksums(sealed), "quick", budget=0)
    assert not report.ok and [Path(d.file).name for d in report.damaged] == ["big.bin"]


def test_a_middle_block_is_caught_by_a_full_check_and_by_a_quick_one_within_its_budget(sealed):
    path = sealed / "big.bin"
    data = bytearray(path.read_bytes())
    data[2 * BLOCK + 7] ^= 0x01  # one bit in the third block
    path.write_bytes(data)
    manifest = read_checksums(sealed)
    assert check(sealed, manifest, "quick", budget=0).ok  # not sampled: the quick check cannot see it
    assert not check(sealed, manifest, "quick", budget=4 * BLOCK).ok  # every middle block fits the budget
    [damage] = check(sealed, manifest, "full").damaged
    assert "block 2" in damage.reason


def test_a_damaged_manifest_is_damage_and_a_missing_one_is_a_directory_sealed_without(sealed):
    (sealed / CHECKSUMS).write_text("{not json")
    report = check_dir(sealed)
    assert report is not None and not report.ok and "checksum manifest unreadable" in report.damaged[0].reason
    (sealed / CHECKSUMS).unlink()
    assert check_dir(sealed) is None


def test_quarantine_keeps_the_damaged_thing_with_its_reason(sealed, tmp_path):
    dest = quarantine(sealed, tmp_path / "q" / "dense", "block 3 differs")
    assert not sealed.exists() and (dest / "big.bin").is_file()
    assert (dest.parent / f"{dest.name}.reason.txt").read_text() == "block 3 differs\n"


def test_copy_sparse_keeps_bytes_and_holes(tmp_path):
    """A hole-keeping copy: same bytes and length, holes and zero runs left unallocated, metadata kept."""
    import os

    from embedder.io.atomic import copy_sparse

    src = tmp_path / "mmap.dat"
    with open(src, "wb") as fh:
        fh.write(b"head" * 1000)
        fh.seek(8 << 20)  # a hole, as Edge leaves in its mmap files
        fh.write(bytes(1 << 20))  # written zeros: a non-sparse copy of such a file has them too
        fh.write(b"tail")
        fh.truncate(32 << 20)
    os.utime(src, (1_000_000, 1_000_000))
    dst = tmp_path / "copy.dat"
    assert copy_sparse(src, dst) == str(dst)
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == 32 << 20 and dst.stat().st_mtime == 1_000_000
    assert dst.stat().st_blocks * 512 < 1 << 20  # the 1 MiB of zeros is a hole in the copy too
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    copy_sparse(empty, tmp_path / "empty-copy")
    assert (tmp_path / "empty-copy").read_bytes() == b""
