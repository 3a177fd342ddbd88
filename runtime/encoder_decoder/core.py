"""EncoderDecoderEngineCore: the engine contract for Whisper-style models (engine-core process).

It satisfies runtime/engine/contract.py like the other cores; its requests carry an encoder
input (a log-mel window) besides their decoder prompt;
the scheduler and paged KV cache are the shared ones (prefix caching off: decoder KV depends on
the audio), and the model runner encodes each request once when it is admitted.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fornax.runtime.config import EngineConfig
from fornax.runtime.engine.contract import RunnerType
from fornax.runtime.engine.messages import EncoderInput, EngineCoreOutput, EngineCoreRequest
from fornax.runtime.engine.scheduling_core import (
    SchedulingCoreMixin,
    allocate_kv_cache,
    runtime_info,
)
from fornax.runtime.errors import ConfigError, RequestError
from fornax.runtime.kv_cache.kv_cache_manager import KVCacheManager
from fornax.runtime.loaders.model_files import ModelFiles
from fornax.runtime.sampling.request_prep import check_prompt_ids
from fornax.runtime.scheduler.request import Request
from fornax.runtime.scheduler.scheduler import Scheduler, SchedulerOutput
from fornax.runtime.scheduler.waiting_queue import WaitingQueue

if TYPE_CHECKING:
    from fornax.runtime.worker.model_runner import ModelRunnerOutput

logger = logging.getLogger(__name__)

MAX_NEW_PER_STEP = 8  # requests admitted (so encoded) per step: bounds the stall of running ones
MAX_FEATURE_ABS = 100.0  # Whisper's normalized log-mel lies within about [-1.5, 2.5]
MIN_FRAMES = 2  # a shorter window (realtime partials) is encoded at its length, then silence


@dataclass(eq=False)
class EncoderDecoderRequest(Request):
    """A Request plus its encoder input (kept for recompute after preemption)."""

    encoder_input: Any = None  # EncoderInput
    encoder_features: Any = None  # np.ndarray [mels, frames] float32, decoded once


def decode_encoder_input(enc: EncoderInput | None, num_mel_bins: int,
                         num_frames: int) -> np.ndarray:
    """Validate an encoder input and view it as [mels, frames] float32 (RequestError if bad).

    A window shorter than the model's (`num_frames`) is allowed: the runner encodes only its
    frames and continues the encoder states with those of silence (realtime partial decodes).
    """
    if enc is None:
        raise RequestError("this model transcribes audio: send the audio to "
                           "/v1/audio/transcriptions or /v1/audio/translations", "file")
    shape = list(enc.shape)
    if len(shape) != 2 or shape[0] != num_mel_bins or not MIN_FRAMES <= shape[1] <= num_frames:
        raise RequestError(f"encoder input must have shape [{num_mel_bins}, F] with "
                           f"{MIN_FRAMES} <= F <= {num_frames}, got {shape}", "file")
    if len(enc.data) != num_mel_bins * shape[1] * 4:
        raise RequestError(f"encoder input has {len(enc.data)} bytes, expected "
                           f"{num_mel_bins * shape[1] * 4}", "file")
    feats = np.frombuffer(enc.data, dtype="<f4").reshape(shape)
    if not np.isfinite(feats).all():
        raise RequestError("encoder input holds NaN or infinite values", "file")
    if np.abs(feats).max(initial=0.0) > MAX_FEATURE_ABS:
        raise RequestError(f"encoder input values must lie within +-{MAX_FEATURE_ABS:g} "
                           "(normalized log-mel features)", "file")
    return feats


class EncoderBudgetScheduler(Scheduler):
    """The shared scheduler, admitting at most `max_new` waiting requests per step: every admitted
    request runs the encoder in that step, so a burst of uploads cannot stall the running decodes
    for more than one encoder batch. Those admitted first are the ones of the lowest `priority`
    value (in arrival order among equals), whatever the policy, and no others join them in that
    step: realtime sessions send their final decodes at 0 and partial ones at 1, so a finished
    utterance never waits behind others' partial encodes."""

    max_new = MAX_NEW_PER_STEP

    def schedule(self) -> SchedulerOutput:
        limit = self.max_new
        ordered = list(self.waiting)  # head first
        if any(r.priority != ordered[0].priority for r in ordered):
            ordered = sorted(ordered, key=lambda r: r.priority)  # stable
            best = ordered[0].priority  # this step encodes only the most urgent class
            limit = min(limit, sum(1 for r in ordered if r.priority == best))
        if len(ordered) <= limit:
            return super().schedule()  # everyone may join: the queue stays as it is
        self.waiting = WaitingQueue(self.priority_policy, ordered[:limit])
        try:
            return super().schedule()
        finally:  # the ones not admitted (and any preempted now) first, then those held back
            self.waiting = WaitingQueue(self.priority_policy,
                                        list(self.waiting) + ordered[limit:])


class EncoderDecoderEngineCore(SchedulingCoreMixin):
    """Owns the encoder-decoder runner, the KV-cache manager and the scheduler."""

    runner_type: RunnerType = "transcription"  # the API serves the audio routes
    reports_prefix_cache = False  # decoder KV depends on the audio: nothing is shared

    def __init__(self, config: EngineConfig, files: ModelFiles) -> None:
        from fornax.runtime.encoder_decoder.runner import EncoderDecoderModelRunner

        self.files = files
        hf = files.hf_config
        model_len = int(hf.get("max_target_positions", 448))
        requested = config.model_config.max_model_len
        if requested is not None and requested > model_len:
            raise ConfigError(f"max_model_len ({requested}) is larger than the decoder's "
                              f"maximum ({model_len} from config.json)")
        self.max_model_len = requested or model_len
        self.runner = EncoderDecoderModelRunner(config, files, self.max_model_len)
        sched = dataclasses.replace(config.scheduler_config, max_num_seqs=self.runner.num_slots)
        self.config = dataclasses.replace(config, scheduler_config=sched)
        block_size = config.cache_config.block_size
        num_blocks = allocate_kv_cache(self.runner, block_size, self.max_model_len,
                                       "raise --kv-cache-memory")
        self.kv = KVCacheManager(num_blocks, block_size, self.max_model_len, enable_caching=False)
        self.scheduler = EncoderBudgetScheduler(sched, config.cache_config, self.kv,
                                                self.max_model_len)
        self.info = runtime_info(self.runner, files, num_blocks, block_size,
                                 self.max_model_len, config.device)
        self.runner.eos_token_ids = self.info.eos_token_ids
        self.vocab = self.runner.vocab
        self.num_steps = 0
        logger.info("encoder-decoder engine: %d concurrent requests, KV cache %d blocks of %d",
                    self.runner.num_slots, num_blocks, block_size)

    # ---- admission -----------------------------------------------------------------------------
    def validate_request(self, req: EngineCoreRequest) -> tuple[int, np.ndarray]:
        """Check a request; returns its resolved max_tokens and its encoder features."""
        spec = self.runner.spec
        feats = decode_encoder_input(req.encoder_input, spec.num_mel_bins, spec.num_frames)
        prompt = req.prompt_token_ids
        vocab = self.info.vocab_size
        check_prompt_ids(prompt, vocab, "prompt", noun="decoder prompt")
        if len(prompt) >= self.max_model_len:
            raise RequestError(f"the decoder prompt has {len(prompt)} tokens; the decoder holds "
                               f"{self.max_model_len}", "prompt")
        enc = req.encoder_input
        assert enc is not None
        if any(not 0 <= t < vocab for t in enc.forced_token_ids):
            raise RequestError("a forced token id is out of vocabulary", "forced_token_ids")
        if enc.detect_language and not self.vocab.language_ids:
            raise RequestError("this model has no language tokens to detect", "language")
        params = req.sampling_params  # validated once at the edge (API worker or LLM)
        if params.prompt_logprobs is not None or params.n != 1 or (params.best_of or 1) > 1:
            raise RequestError("prompt_logprobs, n and best_of are not supported for "
                               "transcription requests", "sampling_params")
        room = self.max_model_len - len(prompt)
        return (room if params.max_tokens is None else min(params.max_tokens, room)), feats

    def add_request(self, req: EngineCoreRequest) -> Request:
        max_tokens, feats = self.validate_request(req)
        self.ensure_new_request_id(req.request_id)
        self.check_admit_faults(req.request_id)
        request = EncoderDecoderRequest(
            request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids),
            sampling_params=req.sampling_params, eos_token_ids=self.info.eos_token_ids,
            priority=req.priority, arrival_time=req.arrival_time or time.monotonic(),
            max_tokens=max_tokens, encoder_input=req.encoder_input, encoder_features=feats)
        self.scheduler.add_request(request)
        return request

    # ---- outputs (the step itself is SchedulingCoreMixin's) ------------------------------------
    def _make_output(self, request: Request, new_tokens: list[int],
                     runner_out: ModelRunnerOutput) -> EngineCoreOutput:
        out = super()._make_output(request, new_tokens, runner_out)
        if request.is_finished:
            out.alignment = self.runner.alignment.finish(
                request.request_id, request.output_token_ids, self.vocab.eot)
            out.no_speech_prob = self.runner.no_speech.get(request.request_id)
        return out
