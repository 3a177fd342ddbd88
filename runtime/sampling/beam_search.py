"""Beam search over the engine: each step asks every live beam for its top 2*width next tokens
(prefix caching makes the re-sent prefixes cheap) and keeps the best `width` (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fornax.runtime.errors import RequestError
from fornax.runtime.limits import MAX_N


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    max_width: int = MAX_N  # n, best_of and the beam width share one cap (--max-n)

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or not 1 <= self.beam_width <= self.max_width:
            raise RequestError(f"beam width (n) must be in [1, {self.max_width}] (the cap of n "
                               "and best_of)", "n")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError("max_tokens must be >= 1", "max_tokens")


@dataclass
class Beam:
    """One hypothesis: generated token ids, their logprobs, the running sum."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    cum_logprob: float = 0.0
    finish_reason: str | None = None

    def score(self, length_penalty: float) -> float:
        """HF's normalisation: cumulative logprob over generated length ** length_penalty."""
        return self.cum_logprob / (max(len(self.tokens), 1) ** length_penalty)


@dataclass
class BeamSearchState:
    """The beams of one prompt between steps."""

    params: BeamSearchParams
    eos_token_ids: frozenset[int]
    running: list[Beam] = field(default_factory=lambda: [Beam()])
    finished: list[Beam] = field(default_factory=list)

    @property
    def done(self) -> bool:
        if not self.running:
            return True
        width, lp = self.params.beam_width, self.params.length_penalty
        if len(self.finished) < width:
            return False
        worst = min(b.score(lp) for b in self.finished)
        best_running = max(b.cum_logprob for b in self.running)
        return best_running / (len(self.running[0].tokens) ** lp) <= worst

    def advance(self, candidates: list[list[tuple[int, float]]]) -> None:
        """candidates[i]: (token id, logprob) alternatives for running beam i."""
        width = self.params.beam_width
        pool = sorted(((beam.cum_logprob + lp, i, tid, lp)
                       for i, (beam, alts) in enumerate(zip(self.running, candidates))
                       for tid, lp in alts), key=lambda c: c[0], reverse=True)
        new_running: list[Beam] = []
        for rank, (cum, i, tid, lp) in enumerate(pool):
            parent = self.running[i]
            child = Beam(parent.tokens + [tid], parent.logprobs + [lp], cum)
            if tid in self.eos_token_ids and not self.params.ignore_eos:
                if rank < width:
                    child.finish_reason = "stop"
                    self.finished.append(child)
                continue
            new_running.append(child)
            if len(new_running) == width:
                break
        self.running = new_running
        if self.running and len(self.running[0].tokens) >= self.params.max_tokens:
            for beam in self.running:
                beam.finish_reason = "length"
            self.finished.extend(self.running)
            self.running = []

    def best(self) -> list[Beam]:
        beams = self.finished + self.running
        lp = self.params.length_penalty
        return sorted(beams, key=lambda b: b.score(lp), reverse=True)[: self.params.beam_width]
