"""Paged KV-cache bookkeeping: block pool, prefix-cache hashes, per-request block tables."""
