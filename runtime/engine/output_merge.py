"""Merges one request's EngineCoreOutput deltas into one slot (API worker and engine output thread).

A slot per request, not a queue per request: however slowly a reader drains, what waits for it is
bounded by the number of requests (and each request's own output), never by the number of steps.
"""

from __future__ import annotations

from fornax.runtime.engine.messages import EngineCoreOutput


def merge_output(into: EngineCoreOutput, new: EngineCoreOutput) -> None:
    """Fold `new` (a later delta of the same request) into `into`."""
    into.new_token_ids.extend(new.new_token_ids)
    if new.new_logprobs:
        into.new_logprobs = (into.new_logprobs or []) + new.new_logprobs
    new_prompt = getattr(new, "prompt_logprobs", None)
    if new_prompt:
        if into.prompt_logprobs is None:
            into.prompt_logprobs, into.prompt_logprobs_start = new_prompt, new.prompt_logprobs_start
        else:  # a later chunk (or a resend after preemption) continues at its start position
            keep = max(0, new.prompt_logprobs_start - into.prompt_logprobs_start)
            into.prompt_logprobs = into.prompt_logprobs[:keep] + new_prompt
    into.finish_reason = new.finish_reason or into.finish_reason
    into.stop_reason = new.stop_reason if new.finish_reason is not None else into.stop_reason
    into.num_prompt_tokens = new.num_prompt_tokens or into.num_prompt_tokens
    into.num_cached_tokens = new.num_cached_tokens or into.num_cached_tokens
    for name in ("error", "pooled", "alignment", "no_speech_prob", "timings"):
        value = getattr(new, name, None)
        if value:
            setattr(into, name, value)
