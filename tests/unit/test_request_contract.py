"""The search request's published schema says exactly what the service accepts.

Contract tests and generated clients read the OpenAPI document; a query the schema allows but the
service refuses (a NUL, only whitespace) is a broken promise, found once by schemathesis at random.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from embedder.service import SearchRequest


def _accepted(query: str) -> bool:
    try:
        SearchRequest(collection="sample", query=query)
    except ValidationError:
        return False
    return True


def _allowed(query: str) -> bool:
    schema = SearchRequest.model_json_schema()["properties"]["query"]
    return (schema["minLength"] <= len(query) <= schema["maxLength"]
            and re.search(schema["pattern"], query) is not None)


@pytest.mark.parametrize("query", ["bees", " bees ", "", " ", "\t\n", "\x1c\x1d", "\u3000", "\ufeff", "bees\x00",
                                   "\x00", "a" * 4096, "a" * 4097, "🐝"])
def test_the_schema_and_the_validator_agree_on_edge_cases(query: str) -> None:
    assert _allowed(query) == _accepted(query)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
       | st.text(alphabet=st.sampled_from(" \t\n\x00\x0b\x1c\u00a0\u2028\u3000\ufeffab"), max_size=8))
def test_the_schema_and_the_validator_agree_on_any_text(query: str) -> None:
    assert _allowed(query) == _accepted(query)
