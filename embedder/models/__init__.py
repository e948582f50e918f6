"""Model registries and lazy adapters for dense, sparse and rerank models."""
