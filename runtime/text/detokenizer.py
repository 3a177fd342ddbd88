"""Incremental detokenization with stop strings, over tokenizers' DecodeStream (torch-free)."""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

_PROMPT_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns a request's new token ids into text deltas; finds the first stop string.

    With stop strings, the last `len(longest stop) - 1` characters are held back from streamed
    deltas until it is certain they do not start a stop string, so nothing must be retracted.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], *,
                 skip_special_tokens: bool = True, stop: list[str] | None = None,
                 include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self.stop = [s for s in (stop or []) if s]
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.output_text = ""
        self._num_sent = 0
        self.stopped = False

    def update(self, new_token_ids: list[int]) -> str | None:
        """Add tokens; returns the stop string if one now appears (text is cut at it)."""
        for token_id in new_token_ids:
            if self.stopped:
                break
            piece = self.stream.step(self.tokenizer, token_id)
            if not piece:
                continue
            search_from = max(0, len(self.output_text) - self.holdback)
            self.output_text += piece
            match = self._find_stop(search_from)
            if match is not None:
                return match
        return None

    def _find_stop(self, search_from: int) -> str | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.output_text.find(s, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self.output_text = self.output_text[: idx + len(s) if self.include_stop else idx]
        self.stopped = True
        return s

    def take_delta(self, finished: bool) -> str:
        """New text since the last call (holding back a possible stop-string prefix)."""
        end = len(self.output_text)
        if not finished and not self.stopped and self.stop:
            end = max(self._num_sent, end - self.holdback)
        delta = self.output_text[self._num_sent:end]
        self._num_sent = end
        return delta
