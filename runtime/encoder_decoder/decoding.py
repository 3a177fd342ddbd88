"""Whisper's decoding rules on a batch of logits: suppression, timestamps, language detection (engine core).

The rules follow OpenAI's reference decoder (`SuppressBlank`, `SuppressTokens`,
`ApplyTimestampRules`) and are derived per request from its decoder prompt: a prompt without
`<|notimestamps|>` decodes with timestamp tokens; a request that asks for language detection gets
a language token first, then its forced tokens (task, maybe `<|notimestamps|>`), then text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fornax.runtime.loaders.speech_models import WhisperInfo

MAX_INITIAL_TIMESTAMP_INDEX = 50  # the first timestamp is at most 1.0 s (OpenAI's default)


@dataclass
class WhisperRowState:
    """What the rules need to know about one running request."""

    prompt_len: int
    detect_language: bool
    forced: list[int]
    timestamps: bool
    sot_index: int = -1  # prompt position of <|startoftranscript|> (no-speech probability)

    @property
    def prefix_len(self) -> int:
        """Output tokens before the text: the detected language and the forced tokens."""
        return (1 if self.detect_language else 0) + len(self.forced)


def row_state(vocab: WhisperInfo, prompt: list[int], detect_language: bool,
              forced: list[int]) -> WhisperRowState:
    no_ts, sot = vocab.ids["no_timestamps"], vocab.ids["sot"]
    timestamps = no_ts not in prompt and no_ts not in forced
    sot_index = len(prompt) - 1 - prompt[::-1].index(sot) if sot in prompt else -1
    return WhisperRowState(len(prompt), detect_language, list(forced), timestamps, sot_index)


class WhisperLogitsRules:
    """Applies the rules in place to the logits of the rows sampled this step."""

    def __init__(self, vocab: WhisperInfo, hf_config: dict[str, Any], device: torch.device
                 ) -> None:
        self.vocab = vocab
        ids = vocab.ids
        v = int(hf_config["vocab_size"])
        # never sampled: the config's suppress_tokens, the special and language tokens
        specials = [ids[k] for k in ("sot", "sot_prev", "sot_lm", "translate", "transcribe",
                                     "no_timestamps") if k in ids]
        if "no_speech" in ids:
            specials.append(ids["no_speech"])
        suppress = {t for t in hf_config.get("suppress_tokens") or [] if 0 <= t < v}
        suppress.update(specials)
        suppress.update(vocab.language_ids.values())
        # never the first text token: a blank or end-of-text
        self.begin_suppress = list(hf_config.get("begin_suppress_tokens") or (220, ids["eot"]))
        self.static_np = np.zeros(v, dtype=bool)
        self.static_np[sorted(suppress)] = True
        self.no_ts_np = self.static_np.copy()
        self.no_ts_np[vocab.timestamp_begin:] = True  # text-only decoding never emits timestamps
        self.language_np = np.ones(v, dtype=bool)
        self.language_np[list(vocab.language_ids.values())] = False
        self.device = device

    def apply(self, logits: torch.Tensor, states: list[WhisperRowState],
              outputs: list[np.ndarray]) -> None:
        """logits: [B, V] float32 (modified); outputs[k]: tokens row k generated so far."""
        vocab = self.vocab
        tsb, eot = vocab.timestamp_begin, vocab.eot
        width = logits.shape[1]
        forbid = np.empty((len(states), width), dtype=bool)
        ts_rows = []
        for k, (st, out) in enumerate(zip(states, outputs)):
            n = len(out)
            row = forbid[k]
            if st.detect_language and n == 0:
                row[:] = self.language_np[:width]
                continue
            if n < st.prefix_len:
                row[:] = True
                row[st.forced[n - (1 if st.detect_language else 0)]] = False
                continue
            text = out[st.prefix_len:]
            row[:] = (self.static_np if st.timestamps else self.no_ts_np)[:width]
            if len(text) == 0:
                row[self.begin_suppress] = True
            if not st.timestamps:
                continue
            ts_rows.append(k)
            last_ts = len(text) >= 1 and text[-1] >= tsb
            penult_ts = len(text) < 2 or text[-2] >= tsb
            if last_ts:
                if penult_ts:
                    row[tsb:] = True  # a pair is complete: text (or EOT) must follow
                else:
                    row[:eot] = True  # the pair needs its closing timestamp (or EOT)
            stamps = text[text >= tsb]
            if len(stamps):
                last = int(stamps[-1]) if (last_ts and not penult_ts) else int(stamps[-1]) + 1
                row[tsb:last] = True  # timestamps never decrease; segments are never empty
            if len(text) == 0:
                row[:tsb] = True  # begin with a timestamp, at most MAX_INITIAL_TIMESTAMP_INDEX
                row[tsb + MAX_INITIAL_TIMESTAMP_INDEX + 1:] = True
        logits.masked_fill_(torch.from_numpy(forbid).to(logits.device), float("-inf"))
        if ts_rows:
            idx = torch.tensor(ts_rows, device=logits.device)
            lp = torch.log_softmax(logits[idx].float(), dim=-1)
            ts_mass = lp[:, tsb:].logsumexp(dim=-1)
            text_max = lp[:, :tsb].max(dim=-1).values
            force_ts = idx[ts_mass > text_max]
            if len(force_ts):
                logits[force_ts, :tsb] = float("-inf")
