"""The pooling engine: embeddings, classification and scores over KV-free batches (engine core)."""
