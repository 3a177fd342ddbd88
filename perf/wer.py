"""Word error rate of speech transcripts: normalized words and their edit distance (CLI and tests)."""

from __future__ import annotations

import re
from collections.abc import Sequence

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def spell_number(n: int) -> list[str]:
    """0 <= n < 1000 in words ("two hundred five"): spoken references write numbers as words."""
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        return [_TENS[n // 10]] + ([_ONES[n % 10]] if n % 10 else [])
    return [_ONES[n // 100], "hundred"] + (spell_number(n % 100) if n % 100 else [])


def words(text: str, *, spell_numbers: bool = False) -> list[str]:
    """Lower-case words: anything but letters, digits and apostrophes separates them; with
    `spell_numbers`, whole numbers below 1000 become their words (9 -> nine)."""
    out = re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()
    if not spell_numbers:
        return out
    return [s for w in out for s in (spell_number(int(w)) if w.isdigit() and int(w) < 1000
                                     else [w])]


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
