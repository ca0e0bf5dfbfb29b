"""One-pass inference: KV-cached generation in which retrieval tokens query an index."""
