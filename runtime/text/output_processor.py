"""OutputProcessor: engine token outputs -> text, stop strings, logprobs (API worker / offline LLM)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fornax.runtime.engine.messages import EngineCoreOutput
from fornax.runtime.offline.outputs import CompletionOutput, Logprob
from fornax.runtime.sampling.params import SamplingParams
from fornax.runtime.text.detokenizer import IncrementalDetokenizer
from fornax.runtime.text.tokenizer import TokenizerFront


@dataclass
class RequestState:
    """Text-side state of one engine request (one of the n choices of a user request)."""

    request_id: str
    index: int
    params: SamplingParams
    prompt_token_ids: list[int]
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    num_new_tokens: int = 0  # tokens added by the latest update (for streaming deltas)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.detokenizer.output_text if self.detokenizer else ""

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index, text=self.text, token_ids=list(self.token_ids),
            finish_reason=self.finish_reason, stop_reason=self.stop_reason,
            logprobs=self.logprobs,
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None)


class OutputProcessor:
    """Keeps one RequestState per engine request and applies engine outputs to it."""

    def __init__(self, tokenizer: TokenizerFront) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(self, request_id: str, index: int, params: SamplingParams,
                    prompt_token_ids: list[int]) -> RequestState:
        detok = None
        if params.detokenize:
            detok = IncrementalDetokenizer(
                self.tokenizer.tokenizer, prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens, stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output)
        state = RequestState(request_id, index, params, prompt_token_ids, detok,
                             logprobs=[] if params.logprobs is not None else None,
                             prompt_logprobs=[None] if params.prompt_logprobs is not None
                             else None)
        self.states[request_id] = state
        return state

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestState], list[str]]:
        """Apply outputs; returns the touched states and ids the engine must abort (stop strings)."""
        touched: list[RequestState] = []
        to_abort: list[str] = []
        for out in outputs:
            state = self.states.get(out.request_id)
            if state is None or state.finished:
                continue
            state.num_cached_tokens = out.num_cached_tokens
            new_ids = out.new_token_ids
            state.token_ids.extend(new_ids)
            state.num_new_tokens = len(new_ids)
            if out.new_logprobs and state.logprobs is not None:
                for lp in out.new_logprobs:
                    entry = self._logprob_entry(lp)
                    state.cumulative_logprob += entry[lp.token_ids[0]].logprob
                    state.logprobs.append(entry)
            if out.prompt_logprobs and state.prompt_logprobs is not None:
                del state.prompt_logprobs[out.prompt_logprobs_start:]
                state.prompt_logprobs.extend(self._logprob_entry(lp)
                                             for lp in out.prompt_logprobs)
            stop_str = state.detokenizer.update(new_ids) if state.detokenizer else None
            if stop_str is not None:
                state.finish_reason, state.stop_reason = "stop", stop_str
                if out.finish_reason is None:
                    to_abort.append(out.request_id)
            elif out.finish_reason is not None:
                state.finish_reason, state.stop_reason = out.finish_reason, out.stop_reason
            touched.append(state)
            if state.finished:
                self.states.pop(out.request_id, None)
        return touched, to_abort

    def _logprob_entry(self, lp) -> dict[int, Logprob]:
        """{token id: Logprob}: the chosen token (its true rank) first, then the top-k."""
        entry: dict[int, Logprob] = {}
        for pos, (tid, val) in enumerate(zip(lp.token_ids, lp.logprobs)):
            if tid not in entry:
                entry[tid] = Logprob(val, lp.rank if pos == 0 else pos,
                                     self.tokenizer.decode([tid], False))
        return entry

    def abort(self, request_id: str) -> None:
        self.states.pop(request_id, None)
