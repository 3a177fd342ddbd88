"""Runs one API request (prompts x n choices) through the engine, yielding deltas (API worker)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fornax.api.generation.sampling import build_sampling_params
from fornax.api.protocol.openai import PromptTokenUsageInfo, UsageInfo, _SamplingFields
from fornax.api.server.errors import APIError
from fornax.api.server.http import Request
from fornax.api.server.metrics import finish_label
from fornax.api.server.state import AppState
from fornax.runtime.engine.messages import EngineCoreRequest, RequestTimings
from fornax.runtime.limits import MAX_CHOICES_PER_REQUEST, clip_for_log
from fornax.runtime.offline.outputs import Logprob
from fornax.runtime.sampling.params import SamplingParams
from fornax.runtime.sampling.request_prep import child_requests

logger = logging.getLogger(__name__)


class _Choice(Protocol):
    index: int


C = TypeVar("C", bound=_Choice)


@dataclass
class PromptInput:
    token_ids: list[int]
    text: str | None = None


def is_token_ids(value: Any) -> bool:
    """A non-empty list of ints (bools are not token ids)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def input_items(value: Any, param: str, shapes: str, empty: str | None = None) -> list[Any]:
    """The inputs of a field that takes one input or a list of them (a string or token ids
    each): 400 naming `param` when it is missing, empty (`empty`, else `shapes`) or neither."""
    if value is None:
        raise APIError(400, f"{param} is required", param)
    if isinstance(value, str) or is_token_ids(value):
        return [value]
    if isinstance(value, list) and value:
        return value
    raise APIError(400, empty if empty and isinstance(value, list) else shapes, param)


@dataclass
class ChoiceUpdate:
    """What one choice produced since the last update."""

    index: int
    prompt_index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None


Updates = AsyncIterator[list[ChoiceUpdate]]


@dataclass
class _ChoiceTiming:
    arrival: float
    first: float | None = None
    last: float | None = None
    num_tokens: int = 0
    num_cached: int = 0
    num_prompt: int = 0
    max_tokens: int | None = None  # the request's max_tokens (vllm:request_params_max_tokens)
    prompt_index: int = 0
    finished: bool = False


@dataclass
class Generation:
    """The engine requests of one API request and their text-side state.

    Each prompt gets `count` candidates: n, or best_of when larger (then the n with the highest
    cumulative logprob are kept, see `pick`). Updates carry the candidate index
    `prompt_index * count + j`, which is the choice index whenever count == n.
    """

    state: AppState
    request_id: str
    prompts: list[PromptInput]
    params: SamplingParams
    priority: int = 0
    cache_salt: str | None = None
    record_metrics: bool = True
    timings: dict[str, _ChoiceTiming] = field(default_factory=dict)
    cumulative: dict[int, float] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[dict[int, Logprob] | None]] = field(default_factory=dict)
    _first_ids: list[str] = field(default_factory=list)  # each prompt's first engine request

    @property
    def n(self) -> int:
        return self.params.n

    @property
    def count(self) -> int:
        return max(self.params.n, self.params.best_of or 1)

    @property
    def num_candidates(self) -> int:
        return len(self.prompts) * self.count

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)

    @property
    def num_completion_tokens(self) -> int:
        return sum(t.num_tokens for t in self.timings.values())

    @property
    def num_cached_tokens(self) -> int:
        """Prefix-cache hits of each prompt's first candidate."""
        return sum(self.timings[rid].num_cached for rid in self._first_ids if rid in self.timings)

    def usage(self) -> UsageInfo:
        """Token counts so far (prompts counted once however many choices)."""
        prompt, completion = self.num_prompt_tokens, self.num_completion_tokens
        return UsageInfo(prompt, prompt + completion, completion,
                         PromptTokenUsageInfo(self.num_cached_tokens))

    def pick(self, candidates: list[C]) -> list[C]:
        """best_of: the n most likely candidates of each prompt, best first (else all, in order),
        numbered as the answer's choices."""
        if self.count == self.n:
            return candidates
        out: list[C] = []
        for i in range(len(self.prompts)):
            idx = range(i * self.count, (i + 1) * self.count)
            best = sorted(idx, key=lambda c: self.cumulative.get(c, float("-inf")), reverse=True)
            out.extend(candidates[c] for c in best[: self.n])
        for index, choice in enumerate(out):
            choice.index = index
        return out

    def _child_requests(self, arrival: float) -> list[EngineCoreRequest]:
        requests = []
        for i, prompt in enumerate(self.prompts):
            children = child_requests(f"{self.request_id}-{i}", prompt.token_ids, self.params,
                                      self.state.max_model_len, arrival_time=arrival,
                                      priority=self.priority, cache_salt=self.cache_salt)
            self._first_ids.append(children[0].request_id)
            requests.extend(children)
        return requests

    async def start(self) -> Updates:
        """Send the requests and wait for the first results, so that a refusal (400, 503) is still
        answered with its own status before any streamed bytes; then every batch, the first
        included. Closing it aborts what still runs."""
        updates = self.updates()
        first = await updates.__anext__()
        return _chained(first, updates)

    async def updates(self) -> Updates:
        """Send the requests, then yield each batch of choice updates until all choices finish.

        Whatever is still running when the caller stops (client gone, error) is aborted.
        """
        engine, processor = self.state.engine, self.state.processor
        arrival = time.monotonic()
        requests = self._child_requests(arrival)
        where: dict[str, tuple[int, int]] = {}
        for k, req in enumerate(requests):
            where[req.request_id] = (k // self.count, k)
            self.timings[req.request_id] = _ChoiceTiming(
                arrival, num_prompt=len(req.prompt_token_ids),
                max_tokens=req.sampling_params.max_tokens, prompt_index=k // self.count)
        unfinished = set(where)
        failed = False
        group = await engine.add(requests)
        for req in requests:
            processor.add_request(req.request_id, where[req.request_id][1], req.sampling_params,
                                  req.prompt_token_ids)
        try:
            while unfinished:
                outs = await group.next()
                now = time.monotonic()
                touched, to_abort = processor.process(outs)
                if to_abort:
                    await engine.abort(to_abort)
                cached = {o.request_id: o.num_cached_tokens for o in outs}
                phases = {o.request_id: o.timings for o in outs if o.timings is not None}
                batch = []
                for st in touched:
                    rid = st.request_id
                    prompt_index, index = where[rid]
                    k = st.num_new_tokens
                    self._observe(rid, k, now, cached.get(rid, 0), len(st.prompt_token_ids))
                    text = st.detokenizer.take_delta(st.finished) if st.detokenizer else ""
                    new_lps = st.logprobs[-k:] if st.logprobs is not None and k else (
                        [] if st.logprobs is not None else None)
                    batch.append(ChoiceUpdate(
                        index=index, prompt_index=prompt_index, text=text,
                        token_ids=st.token_ids[-k:] if k else [], logprobs=new_lps,
                        finish_reason=st.finish_reason, stop_reason=st.stop_reason))
                    prompt_lps = getattr(st, "prompt_logprobs", None)
                    if prompt_lps is not None and prompt_index not in self.prompt_logprobs:
                        self.prompt_logprobs[prompt_index] = prompt_lps  # filled in place
                    if st.finished:
                        unfinished.discard(rid)
                        self.cumulative[index] = st.cumulative_logprob
                        self._finished(rid, finish_label(st.finish_reason, st.stop_reason),
                                       now, phases.get(rid))
                if batch:
                    yield batch
        except APIError as exc:
            failed = True  # refused by the engine, or the engine died: not a finished request
            if exc.status >= 500 and exc.status != 503:  # 503: refused (overload), not served
                for rid in unfinished:  # failed while being served: vLLM's "error" finish
                    self._finished(rid, "error", time.monotonic())
            raise
        finally:
            if unfinished:
                for rid in unfinished:
                    processor.abort(rid)
                    if not failed:
                        self._finished(rid, "abort", time.monotonic())
                await engine.abort(list(unfinished))

    def _observe(self, rid: str, num_new: int, now: float, num_cached: int,
                 num_prompt: int) -> None:
        """Token counts and latencies: TTFT at the first token, then one inter-token latency per
        token (a merged delivery of k tokens spreads its gap over the k)."""
        if num_new <= 0:
            return
        t = self.timings[rid]
        first = t.first is None
        gap = 0.0 if first else (now - (t.last or now)) / num_new
        if first:
            t.first, t.num_cached = now, num_cached
        t.last = now
        t.num_tokens += num_new
        if not self.record_metrics:
            return
        metrics = self.state.metrics
        if first:
            metrics.first_token(num_prompt, num_cached, now - t.arrival)
        else:
            for _ in range(num_new):
                metrics.itl.observe(gap)
        metrics.generation_tokens.inc(num_new)

    def _finished(self, rid: str, reason: str, now: float,
                  phases: RequestTimings | None = None) -> None:
        t = self.timings[rid]
        t.finished = True
        if not self.record_metrics:
            return
        metrics = self.state.metrics
        metrics.finished(reason, e2e=now - t.arrival, num_prompt=t.num_prompt,
                         num_generation=t.num_tokens, num_cached=t.num_cached,
                         max_tokens=t.max_tokens, timings=phases)
        siblings = [s for s in self.timings.values() if s.prompt_index == t.prompt_index]
        if all(s.finished for s in siblings):  # the prompt's last choice: vLLM's parent request
            metrics.parent_finished(self.n, max(s.num_tokens for s in siblings))



async def _chained(first: list[ChoiceUpdate], rest: Updates) -> Updates:
    try:
        yield first
        async for batch in rest:
            yield batch
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


def new_request_id(prefix: str, user_id: str | None) -> tuple[str, str]:
    """(response id, engine id prefix): the user's request_id is echoed, engine ids stay unique."""
    unique = uuid.uuid4().hex
    public = f"{prefix}-{user_id}" if user_id else f"{prefix}-{unique}"
    return public, f"{public}-{unique[:8]}" if user_id else public


def request_sampling_params(state: AppState, body: _SamplingFields, *, max_tokens: int,
                            logprobs: int | None, extra: dict | None,
                            logprobs_param: str = "logprobs") -> SamplingParams:
    """A chat or completions request's SamplingParams under the server's defaults and limits
    (the logprob limit is checked here only; `logprobs_param` names the field that asked)."""
    return build_sampling_params(body, max_tokens=max_tokens, logprobs=logprobs, extra=extra,
                                 defaults=state.sampling_defaults,
                                 max_logprobs=state.engine_info.max_logprobs,
                                 tokenizer=state.tokenizer,
                                 vocab_size=state.engine_info.vocab_size,
                                 limits=state.settings.input_limits,
                                 logprobs_param=logprobs_param)


def begin_generation(req: Request, body: _SamplingFields, id_prefix: str,
                     prompts: list[PromptInput], *, max_tokens: int, logprobs: int | None,
                     extra: dict | None = None, logprobs_param: str = "logprobs",
                     watch: bool = True) -> tuple[Generation, str, int]:
    """The Generation of an API request (its SamplingParams built and validated once, see
    request_sampling_params), its public id and creation time; a client disconnect from now on
    aborts its engine requests (unless not `watch`: background work)."""
    state = req.state
    params = request_sampling_params(state, body, max_tokens=max_tokens, logprobs=logprobs,
                                     extra=extra, logprobs_param=logprobs_param)
    count = max(params.n, params.best_of or 1)
    if len(prompts) * count > MAX_CHOICES_PER_REQUEST:
        raise APIError(400, f"{len(prompts)} prompt(s) x {count} choices is more than the "
                       f"{MAX_CHOICES_PER_REQUEST} sequences one request may start", "n")
    public_id, engine_id = new_request_id(id_prefix, body.request_id or req.request_id)
    if state.settings.log_requests:
        logger.info("%s request %s: %d prompt(s), %d prompt tokens, %s", id_prefix, public_id,
                    len(prompts), sum(len(p.token_ids) for p in prompts), clip_for_log(params))
    gen = Generation(state, engine_id, prompts, params, body.priority, body.cache_salt)
    if watch:
        req.watch_disconnect()
    return gen, public_id, int(time.time())
