"""Word timestamps from per-token start frames: group tokens into words, clamp to segments (torch-free)."""

from __future__ import annotations

from typing import Any

import msgspec

TIME_PRECISION = 0.02


class Word(msgspec.Struct):
    """A word and its start and end in seconds (OpenAI's verbose_json `words`)."""

    word: str
    start: float
    end: float


def _group(session: Any, token_ids: list[int], no_space: bool) -> list[list[int]]:
    """Indices (into token_ids) of each word: a word starts at a token that begins with a space
    (every token, for scripts without spaces); punctuation stays with the word before it."""
    groups: list[list[int]] = []
    for i, tid in enumerate(token_ids):
        piece = session.decode([tid])
        starts_word = no_space or piece.startswith(" ") or not groups
        if piece.strip() == "" and groups:
            starts_word = False
        if starts_word:
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def words_of_segment(session: Any, tokens: list[int], alignment: list[int], start_i: int,
                     end_i: int, offset: float, seg_start: float, seg_end: float,
                     no_space: bool) -> list[Word]:
    """Words of tokens[start_i:end_i] (one segment of a window) with times from `alignment`.

    alignment[k] is the start frame (20 ms) of window token k, or -1 (timestamps, prefix). A word
    runs from its first token's frame to the next aligned token's frame (the next word, or the
    final end-of-text), clamped into the segment and kept non-decreasing.
    """
    eot = session.info.eot
    text_idx = [k for k in range(start_i, end_i) if tokens[k] < eot]
    if not text_idx:
        return []
    times = {k: offset + alignment[k] * TIME_PRECISION
             for k in range(len(alignment)) if alignment[k] >= 0}
    after = sorted(times)
    words: list[Word] = []
    prev_end = seg_start
    for group in _group(session, [tokens[k] for k in text_idx], no_space):
        ks = [text_idx[g] for g in group]
        text = session.decode([tokens[k] for k in ks]).strip()
        if not text:
            continue
        start = times.get(ks[0], prev_end)
        nxt = next((k for k in after if k > ks[-1]), None)
        end = times[nxt] if nxt is not None else seg_end
        start = min(max(start, prev_end, seg_start), seg_end)
        end = min(max(end, start), seg_end)
        words.append(Word(text, round(start, 2), round(end, 2)))
        prev_end = end
    return words
