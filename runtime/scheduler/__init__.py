"""Continuous batching: the scheduler, its waiting queue and the engine's per-request state (engine core)."""
