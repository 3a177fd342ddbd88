"""Long-form Whisper transcription as a state machine: 30 s windows, seek by timestamps (torch-free).

Used by the API workers (async, over the engine client) and the offline `SpeechToText` (in
process). A session turns audio into one engine request per window: the decoder prompt
(previous text, start-of-transcript, language, task), the window's log-mel features and the
decoding flags; `feed` takes the window's tokens, cuts them into segments at timestamp pairs and
moves the seek to the last complete segment, so a word cut by the window edge is decoded again at
the start of the next window. Temperature fallback follows OpenAI's reference (gzip compression
ratio and average log-probability thresholds).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from fornax.audio.features import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram
from fornax.audio.languages import LANGUAGES, NO_SPACE_LANGUAGES
from fornax.audio.words import Word, words_of_segment
from fornax.runtime.loaders.speech_models import WhisperInfo

TIME_PRECISION = 0.02  # seconds per timestamp token step
INPUT_STRIDE = 2  # mel frames per timestamp step
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
COMPRESSION_RATIO_THRESHOLD = 2.4
LOGPROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6


@dataclass
class TranscribeOptions:
    task: str = "transcribe"  # or "translate"
    language: str | None = None  # a Whisper language code; None: detect (multilingual models)
    prompt: str | None = None
    temperature: float = 0.0  # 0: greedy with OpenAI's temperature fallback
    timestamps: bool = True  # decode timestamp tokens (needed to seek inside long audio)
    word_timestamps: bool = False
    allow_fallback: bool = True
    condition_on_previous_text: bool = True
    seed: int = 0


@dataclass
class WindowRequest:
    """One engine request: a 30 s window and how to decode it."""

    prompt_token_ids: list[int]
    features: np.ndarray  # [mels, N_FRAMES] float32
    content_frames: int
    detect_language: bool
    forced_token_ids: list[int]
    temperature: float
    seed: int
    max_tokens: int
    return_alignment: bool


@dataclass
class WindowResult:
    token_ids: list[int]  # every output token, including the language/forced prefix and EOT
    logprobs: list[float] | None = None  # log-probability of each output token
    alignment: list[int] | None = None  # start frame of each output token (-1: none)
    finish_reason: str | None = "stop"
    no_speech_prob: float | None = None  # P(<|nospeech|>) at the start of the transcript


class TranscriptionSegment(msgspec.Struct):
    """A transcript segment as OpenAI's verbose_json shows it (times in seconds)."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float = 0.0


class Segment(TranscriptionSegment):
    """A segment of a session: the transcript fields and, with word timestamps, its words."""

    words: list[Word] = msgspec.field(default_factory=list)


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


class TranscriptionSession:
    """Windows of one audio file, decoded one after another; segments accumulate."""

    def __init__(self, audio: np.ndarray, info: WhisperInfo, tokenizer: Any,
                 options: TranscribeOptions) -> None:
        self.info, self.tokenizer, self.options = info, tokenizer, options
        self.duration = len(audio) / SAMPLE_RATE
        self.mel = log_mel_spectrogram(audio, info.num_mel_bins, pad_to=len(audio) + N_SAMPLES)
        self.content_frames = len(audio) // HOP_LENGTH
        self.seek = 0
        self.language = options.language
        self.segments: list[Segment] = []
        self.all_tokens: list[int] = []  # the initial prompt, then every segment's tokens
        if options.prompt and options.prompt.strip():
            self.all_tokens = self._encode(" " + options.prompt.strip())
        self.prompt_reset_since = 0
        self._temperatures = (FALLBACK_TEMPERATURES if options.allow_fallback
                              and options.temperature == 0.0 else (options.temperature,))
        self._attempt = 0
        self._failed: list[tuple[float, WindowRequest, list[int], list[int], float]] = []
        self._window = 0
        self._pending: WindowRequest | None = None

    @property
    def done(self) -> bool:
        return self.seek >= self.content_frames

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments).strip()

    @property
    def language_name(self) -> str:
        return LANGUAGES.get(self.language or "en", self.language or "english")

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in token_ids if t < self.info.eot],
                                     skip_special_tokens=True)

    # ---- window requests -----------------------------------------------------------------------
    def next_request(self) -> WindowRequest | None:
        """The request for the window at the current seek (None when the audio is done)."""
        if self.done:
            return None
        info, ids, opts = self.info, self.info.ids, self.options
        sot_seq = [ids["sot"]]
        detect = False
        task = ids["translate"] if opts.task == "translate" else ids["transcribe"]
        forced: list[int] = []
        tail = [] if opts.timestamps else [ids["no_timestamps"]]
        if info.multilingual:
            if self.language is None:
                detect, forced = True, [task] + tail
                tail = []
            else:
                sot_seq += [info.language_ids[self.language], task]
        prompt = sot_seq + tail
        previous = self.all_tokens[self.prompt_reset_since:]
        if previous:
            keep = info.max_target_positions // 2 - 1
            prompt = [ids["sot_prev"]] + previous[-keep:] + prompt
        segment_size = min(N_FRAMES, self.content_frames - self.seek)
        features = np.ascontiguousarray(self.mel[:, self.seek:self.seek + N_FRAMES])
        if features.shape[1] < N_FRAMES:
            features = np.pad(features, ((0, 0), (0, N_FRAMES - features.shape[1])))
        temperature = self._temperatures[self._attempt]
        self._pending = WindowRequest(
            prompt, features, segment_size, detect, forced, temperature,
            seed=opts.seed + 1000 * self._window + self._attempt,
            max_tokens=info.max_target_positions // 2,
            return_alignment=opts.word_timestamps)
        return self._pending

    def partial_text(self, token_ids: list[int]) -> str:
        """The part of the pending window's output so far that is final: everything without
        timestamps, else the segments closed by a timestamp pair (the text after the last pair
        may be decoded again in the next window)."""
        req = self._pending
        prefix = ((1 if req.detect_language else 0) + len(req.forced_token_ids)) if req else 0
        tokens = token_ids[prefix:]
        if self.options.timestamps:
            tsb = self.info.timestamp_begin
            cut = max((i for i in range(1, len(tokens))
                       if tokens[i - 1] >= tsb and tokens[i] >= tsb), default=0)
            tokens = tokens[:cut]
        return self.decode(tokens)

    # ---- window results ------------------------------------------------------------------------
    def feed(self, result: WindowResult) -> list[Segment]:
        """Take the pending window's result; returns the segments it finalized (maybe none, when
        the window is retried at a higher temperature)."""
        req = self._pending
        if req is None:
            raise RuntimeError("feed() without a pending window request")
        tokens, logprobs = list(result.token_ids), list(result.logprobs or [])
        alignment = list(result.alignment or [])
        prefix = (1 if req.detect_language else 0) + len(req.forced_token_ids)
        if req.detect_language and tokens:
            self.language = next((c for c, t in self.info.language_ids.items()
                                  if t == tokens[0]), "en")
        tokens, logprobs, alignment = tokens[prefix:], logprobs[prefix:], alignment[prefix:]
        if tokens and tokens[-1] == self.info.eot:
            tokens = tokens[:-1]
        ratio = compression_ratio(self.decode(tokens))
        avg_logprob = float(sum(logprobs)) / (len(tokens) + 1) if logprobs else 0.0
        attempt = (avg_logprob, req, tokens, alignment, ratio)
        no_speech = result.no_speech_prob or 0.0
        # OpenAI's rule: a likely-silent window whose text is improbable is skipped, not retried
        silent = no_speech > NO_SPEECH_THRESHOLD and avg_logprob < LOGPROB_THRESHOLD
        failed = not silent and (ratio > COMPRESSION_RATIO_THRESHOLD
                                 or avg_logprob < LOGPROB_THRESHOLD)
        self._pending = None
        if failed and self._attempt + 1 < len(self._temperatures):
            self._attempt += 1
            self._failed.append(attempt)
            return []
        if failed and self._failed:  # every temperature failed: keep the most likely attempt
            attempt = max([*self._failed, attempt],
                          key=lambda a: (a[4] <= COMPRESSION_RATIO_THRESHOLD, a[0]))
        self._failed, self._attempt = [], 0
        self._window += 1
        if silent:
            self.seek += req.content_frames
            return []
        avg_logprob, req, tokens, alignment, ratio = attempt
        new = self._segments(req, tokens, alignment, avg_logprob, ratio)
        for seg in new:
            seg.no_speech_prob = no_speech
        for seg in new:
            self.all_tokens.extend(seg.tokens)
        if not self.options.condition_on_previous_text or req.temperature > 0.5:
            self.prompt_reset_since = len(self.all_tokens)
        self.segments.extend(new)
        return new

    def _segments(self, req: WindowRequest, tokens: list[int], alignment: list[int],
                  avg_logprob: float, ratio: float) -> list[Segment]:
        tsb = self.info.timestamp_begin
        window_seek = self.seek
        offset = window_seek * HOP_LENGTH / SAMPLE_RATE
        size = req.content_frames
        is_ts = [t >= tsb for t in tokens]
        slices = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
        single_ending = len(tokens) >= 2 and not is_ts[-2] and is_ts[-1]
        if len(tokens) == 1 and is_ts[0]:
            single_ending = True
        spans: list[tuple[int, int, float, float]] = []  # token range, start, end
        if slices:
            if single_ending:
                slices.append(len(tokens))
            last = 0
            for cur in slices:
                part = tokens[last:cur]
                spans.append((last, cur, offset + (part[0] - tsb) * TIME_PRECISION,
                              offset + (part[-1] - tsb) * TIME_PRECISION))
                last = cur
            if single_ending:
                self.seek += size
            else:
                self.seek += (tokens[last - 1] - tsb) * INPUT_STRIDE
        else:
            duration = size * HOP_LENGTH / SAMPLE_RATE
            stamps = [t for t in tokens if t >= tsb]
            if stamps and stamps[-1] != tsb:
                duration = (stamps[-1] - tsb) * TIME_PRECISION
            spans.append((0, len(tokens), offset, offset + duration))
            self.seek += size
        out = []
        no_space = (self.language or "en") in NO_SPACE_LANGUAGES
        for start_i, end_i, start, end in spans:
            seg_tokens = tokens[start_i:end_i]
            text = self.decode(seg_tokens)
            if not text.strip() or end <= start:
                continue
            seg = Segment(len(self.segments) + len(out), window_seek, start,
                          min(end, max(self.duration, start)), text, seg_tokens,
                          req.temperature, avg_logprob, ratio)
            if alignment:
                seg.words = words_of_segment(self, tokens, alignment, start_i, end_i, offset,
                                             seg.start, seg.end, no_space)
            out.append(seg)
        return out
