"""Test helper: a CudaGraphRunner whose CUDA calls are replaced, so graph capture and replay run
on CPU ('replay' re-runs the forward over the runner's static buffers into the static output)."""

from __future__ import annotations

from typing import Any

from fornax.graphs.cuda_graphs import CudaGraphRunner


class CpuReplayRunner(CudaGraphRunner):
    """Replays with the capture-time attention metadata, as a CUDA graph would (the backend must
    read this step's plan from its fixed buffers); replay_meta() may pick another."""

    def _new_pool(self) -> None:
        return None

    def _sync(self) -> None:
        pass

    def replay_meta(self, captured: Any) -> Any:
        return captured

    def _capture_one(self, size: int, meta: Any, pool: Any) -> tuple[Any, Any]:
        out = self.forward_fn(self.input_ids[:size], self.positions[:size], self.kv_caches, meta)

        def replay() -> None:
            out.copy_(self.forward_fn(self.input_ids[:size], self.positions[:size],
                                      self.kv_caches, self.replay_meta(meta)))

        return type("Graph", (), {"replay": staticmethod(replay)})(), out
