"""Attention backends over the paged KV cache: torch_ref (CPU reference) and flashinfer (GPU)."""
