"""A spy on the fused CPU call (runtime/kernels/fused_decode.py): the rows of every call."""

from __future__ import annotations

from fornax.runtime.kernels.fused_decode import FusedDecode


def spy_fused_calls(monkeypatch) -> list[int]:
    """Rows of every fused call made while the monkeypatch holds (appended as they happen)."""
    calls: list[int] = []
    inner = FusedDecode.run

    def run(self, x, *args):
        calls.append(x.shape[0])
        return inner(self, x, *args)

    monkeypatch.setattr(FusedDecode, "run", run)
    return calls
