"""Incremental Whisper transcription of a live audio stream: utterances, partial decodes, final text (torch-free).

Audio arrives in small chunks. Voice activity (speech start / silence) and the client's commits
cut it into items (utterances); an item is decoded in segments of at most one Whisper window for
its partial text (speech without pauses is cut at `max_segment_s`, at a pause where it can).
While a segment grows, its audio so far is decoded again every `step_s` of new audio; the words
on which two decodes agree ("local agreement") become stable and are sent as provisional deltas.
Each partial decode is forced to start with the stable tokens, so it only generates the tail.

When an item ends, its final text comes from the file path's own decoder (`TranscriptionSession`
of audio/transcribe.py) over the item's whole audio: the same 30 s windows, options, temperature
fallback, timestamps and seek when it is longer than a window, conditioned on the text of the
session's previous items (as the file path conditions each window on the text before it) and
not on the partials. So the final text is what /v1/audio/transcriptions gives for the same
audio, whatever the partials said; the last delta carries the rest of it when it continues what
was sent, and the protocols' final events carry it whole (see api/realtime/handlers.py). Jobs
are plain `WindowRequest`s for the encoder-decoder engine; for partials the engine encodes only
the frames given (plus a margin of silence), so they are cheap.

A pause of `SPECULATE_SILENCE_MS` in the open item starts its final decode at once, over the
audio so far (speech and that much silence after it). When the item then ends (a commit, or the
voice activity's stop) with no voice since, that result is its final text: what came after it
is silence, which would not change the text (the rule `covers` applies to partial decodes), so
the final text is ready at the commit instead of a whole-window encode later. Voice that comes
back makes it stale and the item's final decode runs as usual.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fornax.audio.features import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram
from fornax.audio.transcribe import (
    LOGPROB_THRESHOLD,
    NO_SPEECH_THRESHOLD,
    TranscribeOptions,
    TranscriptionSession,
    WhisperInfo,
    WindowRequest,
)
from fornax.audio.vad import VadConfig, make_vad

logger = logging.getLogger(__name__)

BREAK_PUNCTUATION = frozenset(".,!?;:")
MARGIN_FRAMES = 100  # silence after the audio in a short window (1 s): Whisper likes a pause
FRAME_QUANTUM = 100  # window lengths are multiples of this (1 s), so engine batches share them
MAX_PROMPT_TEXT_TOKENS = 100  # previous text in a partial decode's prompt, last tokens kept
DEFAULT_VAD = VadConfig()
COVER_MARGIN_S = 0.2  # silence after the voice a partial decode must have to count as final
SPECULATE_SILENCE_MS = 300.0  # a pause this long starts the open item's final decode early


@dataclass(frozen=True)
class StreamConfig:
    step_s: float = 0.4  # new audio between two partial decodes of a segment
    agree_gap_s: float = 0.8  # text is stable when a decode of this much less audio agrees
    max_segment_s: float = 25.0  # a segment is cut here even without a pause
    long_segment_s: float = 12.0  # beyond this, a short pause (`long_pause_ms`) ends a segment
    long_pause_ms: int = 200
    partial_max_tokens: int = 48
    final_max_tokens: int = 192


@dataclass
class Segment:
    """One decode unit: its audio, the stable tokens so far and the text already sent."""

    id: int
    item: int  # the protocol's unit (an OpenAI conversation item); a cut segment continues it
    start_sample: int  # stream position of its first sample
    chunks: list[np.ndarray] = field(default_factory=list)
    num_samples: int = 0
    closed: bool = False
    last_in_item: bool = False  # closed by silence or a commit (not cut for length)
    finalized: bool = False  # its partial text is complete (a cut segment keeps its audio
    # in the transcriber until its item's final decode)
    committed: list[int] = field(default_factory=list)  # stable tokens, in every later prompt
    hyps: list[tuple[int, list[int]]] = field(default_factory=list)  # (samples, tokens) of
    # the partial decodes so far, oldest first
    sent: str = ""  # the text of this segment sent so far (no separator)
    decoded_samples: int = 0  # audio covered by the latest partial decode started

    def audio(self) -> np.ndarray:
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        return self.chunks[0] if self.chunks else np.zeros(0, dtype=np.float32)

    def add(self, samples: np.ndarray) -> None:
        if len(samples):
            self.chunks.append(samples)
            self.num_samples += len(samples)

    @property
    def seconds(self) -> float:
        return self.num_samples / SAMPLE_RATE


@dataclass
class DecodeJob:
    """One decode: a partial one of a segment, the last partial one of a segment cut for length
    (`final`), or an item's final decode (`item_final`: the file path's windows over the whole
    item, run through `final_session`; `segment` is the item's last segment)."""

    segment: Segment
    final: bool
    num_samples: int  # the audio this job decodes
    prompt: list[int]  # partial: the decoder prompt; item final: the previous text's tokens
    prefix_len: int  # output tokens before the text (language, task, no-timestamps if detected)
    detect_language: bool
    audio: np.ndarray  # the segment's (item's) first num_samples, taken when the job was made
    item_final: bool = False
    segments: list[Segment] = field(default_factory=list)  # item final: the item's segments
    speculative: bool = False  # item final started at a pause, before the item ended
    voiced_end: int = 0  # speculative: the stream position where its last sound ended
    ready: TranscriptionSession | None = None  # item final: a speculative decode that stands


@dataclass
class StreamOutput:
    """What a decode result means for the client."""

    segment: Segment
    delta: str  # new text (with its separator), maybe ""
    final: bool  # the item is finished: `text` is its final transcript
    text: str | None = None  # the item's final text (file-path decoding), when final
    num_samples: int = 0  # the item's audio, when final


@dataclass
class VadNotice:
    kind: str  # "start" or "stop"
    item: int
    sample: int  # stream position (16 kHz samples)


def is_break(piece: str) -> bool:
    """A token that begins a new word or is break punctuation: the word before it is whole."""
    return piece.startswith(" ") or (piece[:1] in BREAK_PUNCTUATION)


def stable_prefix(prev: list[int], cur: list[int], committed: int,
                  pieces: Any) -> int:
    """How many tokens of `cur` are stable: the longest prefix shared with `prev` that ends
    before a word break in both (so no word of it is cut short), never less than `committed`.

    `pieces(token_id)` is the token's text. Both lists exclude end-of-text: a hypothesis that
    ends after a word does not prove the word whole (the audio may stop inside it)."""
    n = 0
    limit = min(len(prev), len(cur))
    while n < limit and prev[n] == cur[n]:
        n += 1
    for j in range(n, committed, -1):
        if j < len(prev) and j < len(cur) and is_break(pieces(prev[j])) \
                and is_break(pieces(cur[j])):
            return j
    return committed


class StreamingTranscriber:
    """The transcription state of one realtime session."""

    def __init__(self, info: WhisperInfo, tokenizer: Any, *, language: str | None = None,
                 prompt: str | None = None, vad: VadConfig | None = DEFAULT_VAD,
                 config: StreamConfig | None = None, join_items: bool = True,
                 vad_kind: str = "energy") -> None:
        self.info, self.tokenizer = info, tokenizer
        self.config = config or StreamConfig()
        self.language = language if info.multilingual else "en"
        self.vad_config = vad
        self.vad_kind = vad_kind  # "silero" (the server's default) or "energy"
        self._vad = make_vad(vad or VadConfig(), vad_kind)
        self.join_items = join_items  # separators between items too (vLLM's one text per task)
        self._prompt_tokens: list[int] = []
        self.configure(language=self.language, prompt=prompt, vad=vad)
        self.segments: list[Segment] = []  # not yet finalized, in order
        self.total_samples = 0
        self._preroll = np.zeros(0, dtype=np.float32)  # the stream's last second (VAD onsets)
        self._ids = itertools.count()
        self._items = itertools.count()
        self._item: int | None = None  # the open item (None: the next audio starts one)
        self._scopes_with_text: set[int] = set()  # items (or -1: the task) that have text
        self._item_sent: dict[int, str] = {}  # the text of each open item sent as deltas
        self._pieces: dict[int, str] = {}
        self.context: list[int] = list(self._prompt_tokens)  # the session's previous text
        self.speculated: DecodeJob | None = None  # a finished speculative final decode

    # ---- text ----------------------------------------------------------------------------------
    def configure(self, *, language: str | None, prompt: str | None,
                  vad: VadConfig | None) -> None:
        """Change the language, the text prompt or the voice activity settings (None: segments
        end only at commits) for the audio to come."""
        if self.info.multilingual:
            self.language = language
        self._prompt_tokens = []
        if prompt and prompt.strip():
            self._prompt_tokens = self._encode(" " + prompt.strip())[-MAX_PROMPT_TEXT_TOKENS:]
        self.context = list(self._prompt_tokens)
        if vad != self.vad_config:
            self.vad_config = vad
            self._vad = make_vad(vad or VadConfig(), self.vad_kind)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t < self.info.eot],
                                     skip_special_tokens=True)

    def piece(self, token: int) -> str:
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.decode([token])
        return text

    def new_scope(self) -> None:
        """The next text starts a new transcript (no separator before it, and, as for a new
        file, no previous text but the prompt)."""
        self._scopes_with_text.clear()
        self.context = list(self._prompt_tokens)

    def _scope(self, seg: Segment) -> int:
        return -1 if self.join_items else seg.item

    # ---- audio in ------------------------------------------------------------------------------
    @property
    def open_segment(self) -> Segment | None:
        seg = self.segments[-1] if self.segments else None
        return seg if seg is not None and not seg.closed else None

    @property
    def buffered_samples(self) -> int:
        """Audio held in segments not yet finalized."""
        return sum(s.num_samples for s in self.segments)

    def append(self, samples: np.ndarray) -> list[VadNotice]:
        """Take 16 kHz float32 audio; returns speech start/stop notices (voice activity on)."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        base = self.total_samples - len(self._preroll)
        data = np.concatenate([self._preroll, samples]) if len(self._preroll) else samples
        pos = self.total_samples
        self.total_samples += len(samples)
        keep = SAMPLE_RATE
        self._preroll = data[-keep:].copy() if len(data) > keep else data.copy()
        events = self._vad.feed(samples)
        notices: list[VadNotice] = []
        if self.vad_config is None:  # manual: every sample belongs to the open segment
            self._route(data, base, pos, self.total_samples)
            self._cut_if_long()
            return notices
        cursor = pos
        for ev in events:
            seg = self.open_segment
            if ev.kind == "start" and seg is None:
                start = max(ev.sample, base)
                seg = self._open(start)
                notices.append(VadNotice("start", seg.item, start))
                cursor = start
            elif ev.kind == "stop" and seg is not None:
                end = min(ev.at, self.total_samples)
                self._route(data, base, cursor, end)
                cursor = end
                self.close()
                notices.append(VadNotice("stop", seg.item, ev.sample))
        if self.open_segment is not None:
            self._route(data, base, cursor, self.total_samples)
            self._cut_if_long()
        return notices

    def _route(self, data: np.ndarray, base: int, start: int, end: int) -> None:
        if end <= start:
            return
        seg = self.open_segment or self._open(start)
        seg.add(data[start - base:end - base].copy())

    def _open(self, start: int, item: int | None = None) -> Segment:
        if item is None:
            item = self._item if self._item is not None else next(self._items)
        self._item = item
        seg = Segment(next(self._ids), item, start)
        self.segments.append(seg)
        return seg

    def _cut_if_long(self) -> None:
        """Cut a long segment for the partial decodes (the item goes on): at a pause once it
        is `long_segment_s` long, at `max_segment_s` in any case. The item's final decode
        takes all its segments' audio, so a cut never cuts a word of the final text."""
        seg = self.open_segment
        if seg is None:
            return
        cfg = self.config
        pause = self._vad.silent_ms >= cfg.long_pause_ms and seg.seconds >= cfg.long_segment_s
        if seg.seconds >= cfg.max_segment_s or pause:
            seg.closed = True
            self._open(self.total_samples, seg.item)
            self.segments[-1].closed = False

    def close(self) -> int | None:
        """End the open segment and its item (a commit, or silence); the next audio starts a new
        item. Returns the item that ended (None: none was open)."""
        item, seg = self._item, self.open_segment
        self._item = None
        if seg is not None:
            seg.closed = seg.last_in_item = True
            if seg.num_samples == 0:
                seg.finalized = True  # nothing to decode
                self.segments.remove(seg)
        return item

    def clear(self) -> list[Segment]:
        """Drop every segment not yet finalized (OpenAI's input_audio_buffer.clear)."""
        dropped, self.segments = self.segments, []
        self._item = None
        self.speculated = None
        for seg in dropped:
            self._item_sent.pop(seg.item, None)
        return dropped

    def _item_ended(self, item: int) -> bool:
        return any(s.item == item and s.last_in_item for s in self.segments)

    # ---- decode jobs ---------------------------------------------------------------------------
    def next_job(self) -> DecodeJob | None:
        """The decode to run now: the oldest ended item's final one, else the last partial one
        of a segment cut for length, else a partial one of the open segment once `step_s` of
        new audio arrived (None: nothing due). Items finish in order, so each final decode has
        the text of the items before it."""
        for seg in self.segments:
            if seg.closed and self._item_ended(seg.item):
                return self._item_job(seg.item)
            if seg.finalized:
                continue  # a cut segment whose partial text is complete
            if seg.closed:
                return self._job(seg, final=True)
            if self._speculation_valid(seg.item):
                return None  # the item's final text is ready: only silence came since
            if self._pausing(seg):
                return self._speculative_job(seg.item)
            new = seg.num_samples - seg.decoded_samples
            if new >= self.config.step_s * SAMPLE_RATE:
                return self._job(seg, final=False)
            return None
        return None

    def covers(self, job: DecodeJob) -> bool:
        """Whether a partial job of a segment that has since closed can stand as its final one:
        it has all the segment's voiced audio and `COVER_MARGIN_S` after it (what it lacks is
        silence, which would not change the text), so no decode needs to start again."""
        seg = job.segment
        if not seg.closed or seg not in self.segments or seg.last_in_item:
            return False  # the end of an item: its final decode is the file path's
        voiced_end = min(seg.num_samples, self._vad.last_voiced - seg.start_sample
                         + int(COVER_MARGIN_S * SAMPLE_RATE))
        return job.num_samples >= max(voiced_end, 1)

    def refresh(self, job: DecodeJob) -> None:
        """A partial job that waited for its turn takes the segment's audio so far."""
        seg = job.segment
        if job.final or seg not in self.segments or seg.num_samples <= job.num_samples:
            return
        job.num_samples = seg.decoded_samples = seg.num_samples
        job.audio = seg.audio()[: seg.num_samples]

    def _item_job(self, item: int) -> DecodeJob:
        segs = [s for s in self.segments if s.item == item]
        spec = self.speculated if self._speculation_valid(item) else None
        self.speculated = None
        if spec is not None:  # decoded at the pause; only silence came since
            return DecodeJob(segs[-1], True, spec.num_samples, spec.prompt, 0, False, spec.audio,
                             item_final=True, segments=segs, ready=spec.ready)
        parts = [s.audio()[: s.num_samples] for s in segs]
        audio = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return DecodeJob(segs[-1], True, len(audio), list(self.context), 0, False, audio,
                         item_final=True, segments=segs)

    # ---- speculative final decodes -------------------------------------------------------------
    def _pausing(self, seg: Segment) -> bool:
        """The open item's voice has paused `SPECULATE_SILENCE_MS` and that pause has no
        speculative decode yet (voice activity on: with manual turns the client decides)."""
        vad = self._vad
        if self.vad_config is None or not vad.speaking or vad.silent_ms < SPECULATE_SILENCE_MS \
                or vad.last_voiced <= seg.start_sample:
            return False
        spec = self.speculated
        return spec is None or spec.segment.item != seg.item \
            or spec.voiced_end != vad.last_sound

    def pausing(self) -> bool:
        """The open item paused long enough for its speculative final decode."""
        seg = self.open_segment
        return seg is not None and self._pausing(seg)

    def _speculation_valid(self, item: int) -> bool:
        """A finished speculative decode of `item` stands: no voice since (nor a frame the
        detector did not call silent), same previous text."""
        spec = self.speculated
        return spec is not None and spec.segment.item == item and spec.ready is not None \
            and spec.voiced_end == self._vad.last_sound and spec.prompt == self.context \
            and all(s in self.segments for s in spec.segments)

    def _speculative_job(self, item: int) -> DecodeJob:
        job = self._item_job(item)
        job.speculative, job.voiced_end = True, self._vad.last_sound
        self.speculated = None
        return job

    def stale(self, job: DecodeJob) -> bool:
        """A speculative final decode (in flight) is moot: sound came after its pause, so its
        result cannot stand (`_speculation_valid`) and the item's final decode runs anyway."""
        return job.speculative and job.voiced_end != self._vad.last_sound

    def speculation_done(self, job: DecodeJob, session: TranscriptionSession) -> None:
        """A speculative final decode finished: keep it for the item's end."""
        job.ready = session
        self.speculated = job

    def final_session(self, job: DecodeJob) -> TranscriptionSession:
        """The file path's decoder over an ended item's audio, with the file path's options
        (greedy with temperature fallback; timestamps and seek past one window), conditioned on
        the session's previous text (NumPy work: run it off the event loop)."""
        options = TranscribeOptions(language=self.language,
                                    timestamps=len(job.audio) > N_SAMPLES)
        session = TranscriptionSession(job.audio, self.info, self.tokenizer, options)
        session.all_tokens = list(job.prompt)
        return session

    def _job(self, seg: Segment, final: bool) -> DecodeJob:
        ids, info = self.info.ids, self.info
        previous = self.context[-MAX_PROMPT_TEXT_TOKENS:]
        prompt = [ids["sot_prev"]] + previous if previous else []
        prompt.append(ids["sot"])
        detect = False
        if info.multilingual:
            if self.language is None:
                detect = True  # the first decode finds the language; [sot] then forced tokens
            else:
                prompt += [info.language_ids[self.language], ids["transcribe"]]
        if not detect:
            prompt.append(ids["no_timestamps"])
            prompt += seg.committed
        seg.decoded_samples = seg.num_samples
        audio = seg.audio()[: seg.num_samples]  # here, not in window(): appends go on meanwhile
        return DecodeJob(seg, final, seg.num_samples, prompt, 3 if detect else 0, detect, audio)

    def window(self, job: DecodeJob) -> WindowRequest:
        """The engine request of a job: log-mel of the segment's audio plus a silent margin
        (NumPy work: run it off the event loop; it reads only the job)."""
        audio = job.audio
        content = len(audio) // HOP_LENGTH
        frames = min(N_FRAMES, -(-(content + MARGIN_FRAMES) // FRAME_QUANTUM) * FRAME_QUANTUM)
        mel = log_mel_spectrogram(audio, self.info.num_mel_bins, pad_to=frames * HOP_LENGTH)
        features = np.ascontiguousarray(mel[:, :frames])
        if features.shape[1] < frames:
            features = np.pad(features, ((0, 0), (0, frames - features.shape[1])),
                              constant_values=-1.5)
        room = self.info.max_target_positions - len(job.prompt) - 1
        cfg = self.config
        max_tokens = max(1, min(cfg.final_max_tokens if job.final else cfg.partial_max_tokens,
                                room))
        forced = [self.info.ids["transcribe"], self.info.ids["no_timestamps"]] \
            if job.detect_language else []
        return WindowRequest(list(job.prompt), features, min(content, frames),
                             job.detect_language, forced, 0.0, 0, max_tokens, False)

    # ---- results -------------------------------------------------------------------------------
    def feed(self, job: DecodeJob, token_ids: list[int], logprobs: list[float] | None = None,
             no_speech_prob: float | None = None) -> StreamOutput | None:
        """Take a job's output tokens; returns the new stable text (None: the segment is gone)."""
        seg = job.segment
        if seg not in self.segments:
            return None  # cleared meanwhile
        tokens = list(token_ids)
        if job.detect_language and tokens:
            self.language = next((c for c, t in self.info.language_ids.items()
                                  if t == tokens[0]), "en")
            tokens = tokens[job.prefix_len:]  # the language, then the forced task and no-ts
        if tokens and tokens[-1] == self.info.eot:
            tokens = tokens[:-1]
        tokens = [t for t in tokens if t < self.info.eot]
        if self._silent(seg, tokens, logprobs, no_speech_prob):
            tokens = []
        hyp = seg.committed + tokens
        if job.final:  # a segment cut for length: its partial text is complete
            seg.committed = hyp
            seg.finalized = True
            return StreamOutput(seg, self._delta(seg, final=True), False)
        gap = self.config.agree_gap_s * SAMPLE_RATE
        older = [h for n, h in seg.hyps if n <= job.num_samples - gap]
        if older:
            stable = stable_prefix(older[-1], hyp, len(seg.committed), self.piece)
            if stable > len(seg.committed):
                candidate = hyp[:stable]
                if not self.decode(candidate).endswith("\ufffd"):
                    seg.committed = candidate
        seg.hyps = [(n, h) for n, h in seg.hyps if h[:len(seg.committed)] == seg.committed]
        seg.hyps = seg.hyps[-7:] + [(job.num_samples, hyp)]
        return StreamOutput(seg, self._delta(seg), False)

    def _silent(self, seg: Segment, tokens: list[int], logprobs: list[float] | None,
                no_speech_prob: float | None) -> bool:
        """OpenAI's rule: likely silence whose text is improbable is no text (nothing stable)."""
        if seg.committed or not tokens or no_speech_prob is None:
            return False
        avg = float(sum(logprobs[-len(tokens) - 1:])) / (len(tokens) + 1) if logprobs else 0.0
        return no_speech_prob > NO_SPEECH_THRESHOLD and avg < LOGPROB_THRESHOLD

    def finish_item(self, job: DecodeJob, session: TranscriptionSession | None
                    ) -> StreamOutput | None:
        """An item's final decode is done (`session` None: it failed, the text sent stands).
        Returns the rest of the text as a delta when the final text continues what was sent
        (else no delta: the final text replaces the partial one), and the final text."""
        segs = [s for s in job.segments if s in self.segments]
        if not segs:
            return None  # cleared meanwhile
        for seg in segs:
            seg.finalized = True
            self.segments.remove(seg)
        item, scope = job.segment.item, self._scope(job.segment)
        sent = self._item_sent.pop(item, "")
        if session is None:
            text = sent
        else:
            text = session.text
            if self.language is None and session.language:
                self.language = session.language
            keep = self.info.max_target_positions // 2 - 1
            self.context = session.all_tokens[session.prompt_reset_since:][-keep:]
        delta = ""
        if text.startswith(sent):
            rest = text[len(sent):]
            if rest:
                sep = " " if not sent and scope in self._scopes_with_text else ""
                delta = sep + rest
        else:
            logger.debug("item %d: the final text %r replaces the partial %r", item, text, sent)
        if text:
            self._scopes_with_text.add(scope)
        return StreamOutput(job.segment, delta, True, text,
                            sum(s.num_samples for s in job.segments))

    def _delta(self, seg: Segment, final: bool = False) -> str:
        text = self.decode(seg.committed).lstrip()
        if not final:
            text = text.rstrip()  # a trailing space belongs with the next word
        if not text.startswith(seg.sent):
            logger.warning("stable text changed under a segment (%r -> %r); keeping what was "
                           "sent", seg.sent, text)
            return ""
        delta = text[len(seg.sent):]
        if not delta:
            return ""
        scope = self._scope(seg)
        prefix = " " if not seg.sent and scope in self._scopes_with_text else ""
        seg.sent = text
        self._scopes_with_text.add(scope)
        if seg.item in self._item_sent:  # a later segment of the item: the separator is its own
            self._item_sent[seg.item] += prefix + delta
        else:
            self._item_sent[seg.item] = delta
        return prefix + delta
