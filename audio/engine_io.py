"""Window requests to engine requests, and engine outputs back to window results (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fornax.audio.transcribe import WindowRequest, WindowResult
from fornax.runtime.engine.messages import EncoderInput, EngineCoreOutput, EngineCoreRequest
from fornax.runtime.sampling.params import SamplingParams


def engine_request(request_id: str, window: WindowRequest) -> EngineCoreRequest:
    """The engine request of one window (the API workers and the offline SpeechToText)."""
    params = SamplingParams(temperature=window.temperature, max_tokens=window.max_tokens,
                            seed=window.seed if window.temperature > 0 else None, logprobs=0,
                            skip_special_tokens=False)
    enc = EncoderInput(window.features.tobytes(), list(window.features.shape),
                       content_frames=window.content_frames,
                       detect_language=window.detect_language,
                       forced_token_ids=list(window.forced_token_ids),
                       return_alignment=window.return_alignment)
    return EngineCoreRequest(request_id, list(window.prompt_token_ids), params,
                             encoder_input=enc)


@dataclass
class WindowCollector:
    """Accumulates one window's engine outputs (tokens, their logprobs, the final alignment)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    alignment: list[int] | None = None
    no_speech_prob: float | None = None
    finish_reason: str | None = None

    def add(self, out: EngineCoreOutput) -> None:
        self.token_ids.extend(out.new_token_ids)
        for lp in out.new_logprobs or []:
            self.logprobs.append(lp.logprobs[0])
        if out.alignment is not None:
            self.alignment = out.alignment
        if out.no_speech_prob is not None:
            self.no_speech_prob = out.no_speech_prob
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> WindowResult:
        return WindowResult(self.token_ids, self.logprobs, self.alignment, self.finish_reason,
                            self.no_speech_prob)
