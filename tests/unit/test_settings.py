import json
import re

import pytest

from embedder.errors import ConfigError, UnsafeNameError
from embedder.settings import CollectionInput, resolve_run_config, validate_collection_name


def test_defaults_cover_the_documented_settings():
    cfg = resolve_run_config(read_env=False)
    assert cfg.dense.model == "all-minilm-l6-v2"
    assert cfg.sparse.models == ["qdrant-bm25"]
    assert cfg.sparse.enabled and cfg.rerank.enabled
    assert (cfg.rerank.top_k_candidates, cfg.rerank.top_k) == (100, 20)
    assert cfg.gpu.memory_ceiling_gb == 12.0
    assert cfg.gpu.concurrency_limit_name == "gpu"
    assert cfg.query_policy.mode == "truncate"
    assert set(cfg.sources.values()) == {"default"}


def test_precedence_default_file_env_cli(tmp_path, monkeypatch):
    config_file = tmp_path / "c.toml"
    config_file.write_text('[embedder]\nrerank_top_k = 7\nenable_sparse = false\nrrf_k = 10\n')
    monkeypatch.setenv("EMBEDDER_RERANK_TOP_K", "9")
    monkeypatch.setenv("EMBEDDER_ENABLE_RERANK", "false")
    monkeypatch.setenv("EMBEDDER_QUERY_POLICY__MODE", "hash")
    cfg = resolve_run_config(config_file, {"rerank.top_k": 11, "fuse.method": None})
    assert cfg.rerank.top_k == 11 and cfg.sources["rerank.top_k"] == "cli"
    assert cfg.rerank.enabled is False and cfg.sources["rerank.enabled"] == "env"
    assert cfg.sparse.enabled is False and cfg.sources["sparse.enabled"] == "file"
    assert cfg.fuse.rrf_k == 10 and cfg.sources["fuse.rrf_k"] == "file"
    assert cfg.query_policy.mode == "hash" and cfg.sources["query_policy"] == "env"
    assert cfg.sources["fuse.method"] == "default"  # None overrides are ignored


def test_a_sectioned_file_and_nested_environment(tmp_path, monkeypatch):
    config_file = tmp_path / "c.toml"
    config_file.write_text('[embedder.rerank]\ntop_k = 7\n[embedder.sparse]\nenabled = false\n')
    monkeypatch.setenv("EMBEDDER_RERANK__TOP_K", "9")
    cfg = resolve_run_config(config_file)
    assert cfg.rerank.top_k == 9 and cfg.sources["rerank.top_k"] == "env"
    assert cfg.sparse.enabled is False and cfg.sources["sparse.enabled"] == "file"
    assert cfg.flat_names == []
    bad = tmp_path / "bad.toml"
    bad.write_text('[embedder.rerank]\ntopk = 7\n')
    with pytest.raises(ConfigError, match="unknown settings: rerank.topk"):
        resolve_run_config(bad, read_env=False)


def test_json_config_file_and_unknown_key(tmp_path):
    good = tmp_path / "c.json"
    good.write_text(json.dumps({"fusion": "dbsf"}))
    assert resolve_run_config(good, read_env=False).fuse.method == "dbsf"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fusoin": "dbsf"}))
    with pytest.raises(ConfigError, match="unknown settings: fusoin"):
        resolve_run_config(bad, read_env=False)


def test_invalid_env_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("EMBEDDER_RERANK_TOP_K", "many")
    with pytest.raises(ConfigError, match="EMBEDDER_"):
        resolve_run_config()


@pytest.mark.parametrize("name", ["..", "../etc", "/abs", "a/b", "a\\b", ".hidden", "", "x" * 200, "a..b"])
def test_unsafe_collection_names_are_refused(name):
    with pytest.raises(UnsafeNameError, match=re.escape("is not allowed")):
        validate_collection_name(name)
    with pytest.raises(ValueError):
        CollectionInput(name=name, path="/tmp")


def test_safe_names_pass():
    assert validate_collection_name("scifact_train-v1.2") == "scifact_train-v1.2"
