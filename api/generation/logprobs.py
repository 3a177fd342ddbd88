"""Engine logprobs -> OpenAI's chat and completions logprob shapes (API workers)."""

from __future__ import annotations

from fornax.api.protocol.openai import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
)
from fornax.runtime.offline.outputs import Logprob

Entry = dict[int, Logprob]  # the sampled token first, then the top-k alternatives


def _token(tid: int, lp: Logprob, as_ids: bool) -> str:
    if as_ids:
        return f"token_id:{tid}"
    return lp.decoded_token if lp.decoded_token is not None else ""


def _top(entry: Entry, top_n: int) -> list[tuple[int, Logprob]]:
    ranked = [(tid, lp) for tid, lp in entry.items()
              if lp.rank is not None and 1 <= lp.rank <= top_n]
    ranked.sort(key=lambda item: item[1].rank or 0)
    return ranked


def _finite(value: float) -> float:
    return max(value, -9999.0)  # JSON has no -inf


def chat_logprobs(entries: list[Entry], top_n: int, as_ids: bool = False) -> ChatLogprobs:
    content = []
    for entry in entries:
        tid, lp = next(iter(entry.items()))
        tok = _token(tid, lp, as_ids)
        top = []
        for alt_id, alt in _top(entry, top_n):
            alt_tok = _token(alt_id, alt, as_ids)
            top.append(ChatTopLogprob(alt_tok, _finite(alt.logprob), list(alt_tok.encode("utf-8"))))
        content.append(ChatTokenLogprob(tok, _finite(lp.logprob), list(tok.encode("utf-8")), top))
    return ChatLogprobs(content)


class CompletionLogprobsBuilder:
    """Builds completions logprobs chunk by chunk, keeping text offsets running."""

    def __init__(self, top_n: int, as_ids: bool = False, offset: int = 0) -> None:
        self.top_n = top_n
        self.as_ids = as_ids
        self.offset = offset

    def prompt(self, token_ids: list[int], token_strs: list[str],
               entries: list[Entry | None] | None) -> CompletionLogprobs:
        """Echoed prompt tokens with the engine's prompt logprobs (the first token has none)."""
        out = CompletionLogprobs()
        for pos, (tid, tok) in enumerate(zip(token_ids, token_strs)):
            entry = entries[pos] if entries is not None and pos < len(entries) else None
            out.text_offset.append(self.offset)
            out.tokens.append(tok)
            if entry is None or tid not in entry:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                top = {_token(i, alt, self.as_ids): _finite(alt.logprob)
                       for i, alt in _top(entry, self.top_n)}
                top[tok] = _finite(entry[tid].logprob)
                out.token_logprobs.append(_finite(entry[tid].logprob))
                out.top_logprobs.append(top)
            self.offset += len(tok)
        return out

    def add(self, entries: list[Entry]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for entry in entries:
            tid, lp = next(iter(entry.items()))
            tok = _token(tid, lp, self.as_ids)
            top = {_token(i, alt, self.as_ids): _finite(alt.logprob)
                   for i, alt in _top(entry, self.top_n)}
            top[tok] = _finite(lp.logprob)  # vLLM: the sampled token is always listed
            out.text_offset.append(self.offset)
            out.tokens.append(tok)
            out.token_logprobs.append(_finite(lp.logprob))
            out.top_logprobs.append(top)
            self.offset += len(tok)
        return out


def prompt_logprobs_json(entries: list[Entry | None] | None) -> PromptLogprobs | None:
    """vLLM's `prompt_logprobs`: per prompt position, {token id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [None if e is None else
            {str(tid): PromptLogprob(_finite(lp.logprob), lp.rank, lp.decoded_token)
             for tid, lp in e.items()} for e in entries]


def merge(into: CompletionLogprobs, more: CompletionLogprobs) -> None:
    into.text_offset.extend(more.text_offset)
    into.tokens.extend(more.tokens)
    into.token_logprobs.extend(more.token_logprobs)
    into.top_logprobs.extend(more.top_logprobs)
