"""EncoderDecoderModelRunner: Whisper steps with batched encoding and per-request cross K/V (engine core).

A step first encodes every newly scheduled request in one batch and writes its cross-attention
keys/values into the request's slot, then runs one flat decoder batch (prefills and decodes
together) over the paged self-attention KV cache, applies Whisper's decoding rules and samples
(the inputs and sampling phases shared with the generation runner: worker/step_runner.py).
Slots follow the InputBatch rows (dense: a removed row is refilled by the last one), so the usual
all-decode step reads one contiguous view of the cross store.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from fornax.runtime.attention.backend import make_attention_backend
from fornax.runtime.config import EngineConfig
from fornax.runtime.encoder_decoder.alignment import AlignmentTracker
from fornax.runtime.encoder_decoder.decoding import WhisperLogitsRules, row_state
from fornax.runtime.errors import ConfigError
from fornax.runtime.kernels.packing import pack_linear_weights, packing_supported
from fornax.runtime.kv_cache.sizing import (
    allocate_layer_caches,
    blocks_in_budget,
    full_length_bytes,
)
from fornax.runtime.loaders.model_files import ModelFiles
from fornax.runtime.loaders.speech_models import WhisperInfo
from fornax.runtime.loaders.weights import load_model_weights, resolve_dtype
from fornax.runtime.models.whisper import (
    CrossAttentionMetadata,
    WhisperForConditionalGeneration,
    WhisperSpec,
)
from fornax.runtime.scheduler.scheduler import NewRequestData, SchedulerOutput
from fornax.runtime.worker.step_runner import ModelRunnerOutput, PagedStepRunner, StepInputs

if TYPE_CHECKING:
    from fornax.runtime.encoder_decoder.core import EncoderDecoderRequest

logger = logging.getLogger(__name__)

_DEFAULT_CPU_BYTES = 1024**3  # cross K/V and self-attention KV, each, on CPU
ENCODER_MAX_BATCH = 8  # windows per encoder forward (bounds activation memory)
# A decoder step of at most this many tokens runs its layers and rules on one CPU thread: its
# matmuls are a few hundred KiB each, so a second thread saves microseconds and costs a fork/join
# per op (on a busy machine, a wait for the other thread to be scheduled: ~10 ms per op measured).
# The encoder and the vocabulary projection (tens of MB of weights per step) use every thread.
SMALL_STEP_TOKENS = 16
SILENCE_LOG_MEL = -1.5  # Whisper's normalized log-mel of all-zero audio
# Short windows (realtime partials) whose lengths differ by at most this many frames share one
# encoder forward, the shorter ones padded with silence (what their own margin already is): one
# forward of B windows costs one set of per-op fork/joins instead of B, which on a busy 2-core
# machine is most of a short window's cost. Full windows (files, finals) are never padded.
SHORT_PAD_FRAMES = 200
# Short windows are encoded on one CPU thread: with realtime sessions the API worker (voice
# activity, log-mel, WebSocket frames) shares the cores, and an encoder op that waits for a
# second thread the OS has given to it costs far more than the thread saves (measured on the
# busy 2-core Xeon: a 400-frame window 830-1570 ms on 2 threads, 70-150 ms on 1). Full windows
# (files and finals, ~8x the work) keep every thread.
SHORT_ENCODE_ONE_THREAD = True


def batch_groups(pending: list[tuple[int, np.ndarray]], full: int
                 ) -> list[tuple[int, list[tuple[int, np.ndarray]]]]:
    """(frames, windows) encoder batches of at most ENCODER_MAX_BATCH: full windows together,
    short ones by length, each batch spanning at most SHORT_PAD_FRAMES (padded to its longest)."""
    groups: list[tuple[int, list[tuple[int, np.ndarray]]]] = []
    fulls = [p for p in pending if p[1].shape[1] >= full]
    for i in range(0, len(fulls), ENCODER_MAX_BATCH):
        groups.append((full, fulls[i:i + ENCODER_MAX_BATCH]))
    short = sorted((p for p in pending if p[1].shape[1] < full), key=lambda p: p[1].shape[1])
    chunk: list[tuple[int, np.ndarray]] = []
    for item in short:
        if chunk and (len(chunk) == ENCODER_MAX_BATCH
                      or item[1].shape[1] - chunk[0][1].shape[1] > SHORT_PAD_FRAMES):
            groups.append((chunk[-1][1].shape[1], chunk))
            chunk = []
        chunk.append(item)
    if chunk:
        groups.append((chunk[-1][1].shape[1], chunk))
    return groups


class EncoderDecoderModelRunner(PagedStepRunner):
    """Loads Whisper, owns the paged decoder KV cache and the cross-attention store."""

    def __init__(self, config: EngineConfig, files: ModelFiles, max_model_len: int) -> None:
        self.config, self.files = config, files
        self.device = torch.device(config.device)
        self.max_model_len = max_model_len
        self.block_size = config.cache_config.block_size
        self.dtype = resolve_dtype(config.model_config.dtype, files.hf_config, self.device)
        self.arch = "WhisperForConditionalGeneration"
        start = time.perf_counter()
        self.spec = spec = WhisperSpec.from_hf(files.hf_config)
        self.num_kv_heads, self.head_dim = spec.decoder_heads, spec.head_dim
        self.num_layers = spec.decoder_layers
        self.backend = make_attention_backend(
            config.attention_backend, num_heads=spec.decoder_heads,
            num_kv_heads=spec.decoder_heads, head_dim=spec.head_dim, block_size=self.block_size,
            dtype=self.dtype, device=self.device)
        torch.manual_seed(config.model_config.seed)
        with torch.device(self.device):
            self.model = WhisperForConditionalGeneration(files.hf_config, self.arch,
                                                         self.backend).to(self.dtype)
        self._load_weights()
        self.model.eval()
        if packing_supported(self.device, self.dtype):  # bf16 CPU: no per-call weight reorder
            pack_linear_weights(self.model)
        self.vocab_size = spec.vocab_size
        self.vocab = WhisperInfo.from_folder(files.path, files.hf_config)
        self.rules = WhisperLogitsRules(self.vocab, files.hf_config, self.device)
        self.alignment = AlignmentTracker(files.generation_config, spec)
        logger.info("loaded %s (%s, %s) in %.2f s", files.source or files.path, self.arch,
                    str(self.dtype).removeprefix("torch."), time.perf_counter() - start)
        self.num_slots = self._num_cross_slots()
        self._init_step_state(self.num_slots, config.scheduler_config.max_num_batched_tokens)
        # [slots, 2, H, T_enc, Dh] per decoder layer; never zeroed (slots are written before use)
        self.cross_stores = [
            torch.empty((self.num_slots, 2, spec.decoder_heads, spec.max_source_positions,
                         spec.head_dim), dtype=self.dtype, device=self.device)
            for _ in range(self.num_layers)]
        self.states: dict[str, Any] = {}  # request id -> WhisperRowState
        self.no_speech: dict[str, float] = {}  # request id -> P(no speech), once its SOT is run
        self._to_encode: list[tuple[str, np.ndarray]] = []  # joined this step: (id, features)
        self._silence: torch.Tensor | None = None  # encoder states of a silent window

    # ---- set-up --------------------------------------------------------------------------------
    def _load_weights(self) -> None:
        load_model_weights(self.model, self.model.checkpoint_name, self.files,
                           self.config.model_config, self.arch)

    def cross_bytes_per_request(self) -> int:
        s = self.spec
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * s.max_source_positions * s.d_model * s.decoder_layers * elem

    def _num_cross_slots(self) -> int:
        """Running requests are capped by the cross-attention store: --max-num-seqs or memory."""
        wanted = self.config.scheduler_config.max_num_seqs
        per = self.cross_bytes_per_request()
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * 0.5 * self.config.cache_config.gpu_memory_utilization)
        else:
            budget = _DEFAULT_CPU_BYTES
        slots = min(wanted, budget // per)
        if slots < 1:
            raise ConfigError("not enough memory for one request's cross-attention keys/values")
        if slots < wanted:
            logger.info("at most %d concurrent transcriptions (%.0f MiB of cross-attention "
                        "keys/values each)", slots, per / 2**20)
        return int(slots)

    def determine_num_blocks(self) -> int:
        cache = self.config.cache_config
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        per_block = self.kv_bytes_per_block()
        budget = cache.kv_cache_memory_bytes or full_length_bytes(
            self.max_num_reqs, self.max_blocks_per_req, per_block, _DEFAULT_CPU_BYTES)
        return blocks_in_budget(budget, per_block)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = allocate_layer_caches(self.backend.kv_cache_shape(num_blocks),
                                               self.num_layers, self.dtype, self.device)

    # ---- request state -------------------------------------------------------------------------
    def _remove(self, req_id: str) -> None:
        """Drop a row; the last row moves into its place, and so does its cross K/V slot."""
        row = self.batch.index.get(req_id)
        if row is None:
            return
        last = self.batch.num_reqs - 1
        self.batch.remove(req_id)
        self.states.pop(req_id, None)
        self.no_speech.pop(req_id, None)
        self.alignment.drop(req_id)
        if row != last:
            for store in self.cross_stores:
                store[row].copy_(store[last])

    def _join(self, new: NewRequestData) -> None:
        """A new request's row: batch state, Whisper decoding state, alignment tracking; its
        features wait in `_to_encode` for this step's encoder batch."""
        req = cast("EncoderDecoderRequest", new.request)
        enc = req.encoder_input
        self.batch.add(new.req_id, new.token_ids, new.num_prompt_tokens,
                       new.num_computed_tokens, new.block_ids, req.sampling_params, self.device)
        prompt = list(req.prompt_token_ids)
        self.states[new.req_id] = row_state(self.vocab, prompt, enc.detect_language,
                                            list(enc.forced_token_ids))
        if enc.return_alignment:
            frames = enc.content_frames or self.spec.num_frames
            self.alignment.start(new.req_id, len(prompt), (frames + 1) // 2)
        self._to_encode.append((new.req_id, req.encoder_features))

    def _encode(self, pending: list[tuple[int, np.ndarray]]) -> None:
        """Encode in batches of one window length. A short window (a realtime partial) costs in
        proportion to its frames; its encoder states continue with those of a silent window,
        which the decoder sees after the audio in a full window too. Short windows of nearby
        lengths are padded with silence to one length (`batch_groups`)."""
        for frames, chunk in batch_groups(pending, self.spec.num_frames):
            windows = torch.from_numpy(np.stack([
                f if f.shape[1] == frames else np.pad(
                    f, ((0, 0), (0, frames - f.shape[1])), constant_values=SILENCE_LOG_MEL)
                for _, f in chunk])).to(self.device, self.dtype, non_blocking=True)
            rows = torch.tensor([r for r, _ in chunk], device=self.device)
            threads = torch.get_num_threads()
            one = SHORT_ENCODE_ONE_THREAD and frames < self.spec.num_frames \
                and self.device.type == "cpu" and threads > 1
            if one:
                torch.set_num_threads(1)
            try:
                states = self.model.encode(windows)  # [B, T, d]
            finally:
                if one:
                    torch.set_num_threads(threads)
            if frames < self.spec.num_frames:
                tail = self._silence_states()[:, states.shape[1]:]
                states = torch.cat([states, tail.expand(len(chunk), -1, -1)], dim=1)
            self.model.write_cross_kv(states, rows, self.cross_stores)

    def _silence_states(self) -> torch.Tensor:
        """[1, T_enc, d] encoder states of a window of digital silence (computed once)."""
        if self._silence is None:
            spec = self.spec
            silent = torch.full((1, spec.num_mel_bins, spec.num_frames), SILENCE_LOG_MEL,
                                device=self.device, dtype=self.dtype)
            self._silence = self.model.encode(silent)
        return self._silence

    # ---- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """One step: the scheduler's diff, the new requests' encoding, inputs, the decoder
        forward with cross-attention, P(no speech), Whisper's rules and a token per request."""
        failed: dict[str, tuple[str, BaseException]] = {}
        self._to_encode = []
        self._update_states(out, failed)
        batch = self.batch
        pending = [(batch.index[rid], feats) for rid, feats in self._to_encode
                   if rid in batch.index]
        self._to_encode = []
        # rows in slot order, so the decode rows of a full batch are one contiguous store view
        req_ids = sorted((r for r in out.num_scheduled_tokens if r not in failed),
                         key=batch.index.__getitem__)
        if not req_ids:
            return ModelRunnerOutput({}, {}, failed=failed)
        start = time.perf_counter()
        if pending:
            self._encode(pending)
        encoded = time.perf_counter()
        step = self._prepare_inputs(out, req_ids)
        threads = torch.get_num_threads()
        small = self.device.type == "cpu" and threads > 1 and step.num_tokens <= SMALL_STEP_TOKENS
        self.model.logits_threads = threads if small else 0
        if small:
            torch.set_num_threads(1)
        try:
            return self._decode_step(req_ids, step, failed)
        finally:
            if small:
                torch.set_num_threads(threads)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("step: encoded %s frames in %.0f ms; decoded %d tokens of %d "
                             "requests in %.0f ms", [f.shape[1] for _, f in pending],
                             1000 * (encoded - start), step.num_tokens, len(req_ids),
                             1000 * (time.perf_counter() - encoded))

    def _decode_step(self, req_ids: list[str], step: StepInputs,
                     failed: dict[str, tuple[str, BaseException]]) -> ModelRunnerOutput:
        attn_metadata = self.backend.build_metadata(step.common)
        cross = self._cross_metadata(step.rows, step.num_sched, step.qsl, req_ids, step.computed)
        n = step.num_tokens
        hidden = self.model(self.input_ids[:n], self.positions[:n], self.kv_caches,
                            attn_metadata, self.cross_stores, cross)
        self.alignment.collect(cross)
        self._no_speech(hidden, req_ids, step.computed, step.num_sched, step.qsl)
        if len(step.done_idx) == 0:
            return ModelRunnerOutput({}, {}, failed=failed)
        sampled, logprobs = self._sample(hidden, step, failed)
        return ModelRunnerOutput(sampled, logprobs, failed=failed)

    def _adjust_logits(self, logits: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """Whisper's decoding rules (timestamps, suppressed tokens, forced language)."""
        logits = logits.float()
        self.rules.apply(logits, [self.states[r] for r in step.done_ids],
                         [self.batch.output_ids(int(r)) for r in step.rows[step.done_idx]])
        return logits

    def _no_speech(self, hidden: torch.Tensor, req_ids: list[str], computed: np.ndarray,
                   num_sched: np.ndarray, qsl: np.ndarray) -> None:
        """P(<|nospeech|>) at each request's start-of-transcript, in the step that computes it."""
        token = self.vocab.ids.get("no_speech")
        if token is None:
            return
        rids, idx = [], []
        for i, rid in enumerate(req_ids):
            pos = self.states[rid].sot_index
            if 0 <= pos - int(computed[i]) < int(num_sched[i]):
                rids.append(rid)
                idx.append(int(qsl[i]) + pos - int(computed[i]))
        if rids:
            logits = self.model.compute_logits(hidden[torch.tensor(idx, device=self.device)])
            probs = logits.float().softmax(dim=-1)[:, token].tolist()
            self.no_speech.update(zip(rids, probs))

    def _cross_metadata(self, rows: np.ndarray, num_sched: np.ndarray, qsl: np.ndarray,
                        req_ids: list[str], computed: np.ndarray) -> CrossAttentionMetadata:
        meta = CrossAttentionMetadata()
        dev = self.device
        dec = np.nonzero(num_sched == 1)[0]
        if len(dec):
            meta.decode_token_index = torch.from_numpy(qsl[dec].astype(np.int64)).to(
                dev, non_blocking=True)
            dec_rows = rows[dec]
            first = int(dec_rows[0])
            if np.array_equal(dec_rows, np.arange(first, first + len(dec_rows))):
                meta.decode_slots = slice(first, first + len(dec_rows))
            else:
                meta.decode_slots = torch.from_numpy(dec_rows).to(dev, non_blocking=True)
        for i in np.nonzero(num_sched > 1)[0]:
            meta.prefills.append((int(qsl[i]), int(qsl[i + 1]), int(rows[i])))
        self.alignment.plan(meta, req_ids, rows, qsl, computed, num_sched, dev)
        return meta
