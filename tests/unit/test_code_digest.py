"""The code digests behind cache keys and vector spaces: typing and docs never move them, behaviour always does."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedder.stages.common import _code_form

BASE = '''
"""A module."""
from typing import Any


class Model:
    """A model."""

    dim: int = 384

    def encode(self, texts: list[str], scale: float = 1.0) -> list[float]:
        """Encode."""
        out: list[float] = [len(t) * scale for t in texts]  # a comment
        return out
'''


def _form(tmp_path: Path, source: str) -> bytes:
    path = tmp_path / "m.py"
    path.write_text(source)
    return _code_form(path)


@pytest.mark.parametrize("edit", [
    lambda s: s.replace("texts: list[str]", "texts: Any"),
    lambda s: s.replace("-> list[float]", "-> Any"),
    lambda s: s.replace("out: list[float] =", "out: list[Any] ="),
    lambda s: s.replace('"""Encode."""', '"""Encode the texts, one float each.\\n\\n    Args: ...\\n    """'),
    lambda s: s.replace("# a comment", "# another comment"),
])
def test_a_typing_docs_or_comment_edit_leaves_the_digest(tmp_path, edit):
    assert _form(tmp_path, edit(BASE)) == _form(tmp_path, BASE)


@pytest.mark.parametrize("edit", [
    lambda s: s.replace("len(t) * scale", "len(t) * scale + 1"),
    lambda s: s.replace("scale: float = 1.0", "scale: float = 2.0"),
    lambda s: s.replace("dim: int = 384", "dim: float = 384"),  # a field's type is behaviour (pydantic)
])
def test_a_behaviour_edit_moves_the_digest(tmp_path, edit):
    assert _form(tmp_path, edit(BASE)) != _form(tmp_path, BASE)


def test_data_files_count_byte_for_byte(tmp_path):
    (tmp_path / "a.txt").write_text("the\n")
    assert _code_form(tmp_path / "a.txt") == b"the\n"
