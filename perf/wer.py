"""Word error rate of speech transcripts: normalized words and their edit distance (CLI and tests)."""

from __future__ import annotations

import re
from collections.abc import Sequence


def words(text: str) -> list[str]:
    """Lower-case words: anything but letters, digits and apostrophes separates them."""
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Word-level Levenshtein distance (substitutions, insertions, deletions)."""
    row = list(range(len(hyp) + 1))
    for i in range(1, len(ref) + 1):
        prev, row[0] = row[0], i
        for j in range(1, len(hyp) + 1):
            cur = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, prev + (ref[i - 1] != hyp[j - 1]))
            prev = cur
    return row[len(hyp)]


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Word errors over all pairs divided by the reference words (0 when there are none)."""
    pairs = [(words(ref), words(hyp)) for ref, hyp in zip(refs, hyps)]
    errors = sum(edit_distance(r, h) for r, h in pairs)
    return errors / max(1, sum(len(r) for r, _ in pairs))
