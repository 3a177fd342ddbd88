"""Sampling: SamplingParams and their validation, the batched sampler, logits processors, beam search."""
