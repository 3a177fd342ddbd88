"""EncoderDecoderModelRunner: Whisper steps with batched encoding and per-request cross K/V (engine core).

A step first encodes every newly scheduled request in one batch and writes its cross-attention
keys/values into the request's slot, then runs one flat decoder batch (prefills and decodes
together) over the paged self-attention KV cache, applies Whisper's decoding rules and samples.
Slots follow the InputBatch rows (dense: a removed row is refilled by the last one), so the usual
all-decode step reads one contiguous view of the cross store.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from fornax.runtime.engine import fault_injection
from fornax.runtime.attention.backend import CommonAttentionMetadata, make_attention_backend
from fornax.runtime.config import EngineConfig
from fornax.runtime.errors import ConfigError, ModelLoadError
from fornax.runtime.worker.input_batch import InputBatch
from fornax.runtime.kv_cache.kv_cache_manager import cdiv
from fornax.runtime.kv_cache.sizing import (
    allocate_layer_caches,
    blocks_in_budget,
    full_length_bytes,
)
from fornax.runtime.loaders.model_files import ModelFiles
from fornax.runtime.loaders.weights import init_dummy_weights, iterate_safetensors
from fornax.runtime.sampling.logits_processors import build_logits_inputs
from fornax.runtime.worker.model_runner import ModelRunnerOutput, resolve_dtype
from fornax.runtime.engine.request_failure import is_device_error
from fornax.runtime.models.whisper import (
    CrossAttentionMetadata,
    WhisperForConditionalGeneration,
    WhisperSpec,
)
from fornax.runtime.sampling.sampler import Sampler, SamplingMetadata
from fornax.runtime.scheduler.scheduler import SchedulerOutput
from fornax.runtime.encoder_decoder.alignment import AlignmentTracker
from fornax.runtime.encoder_decoder.decoding import WhisperLogitsRules, WhisperVocab, row_state

logger = logging.getLogger(__name__)

_DEFAULT_CPU_BYTES = 1024**3  # cross K/V and self-attention KV, each, on CPU
ENCODER_MAX_BATCH = 8  # windows per encoder forward (bounds activation memory)
SILENCE_LOG_MEL = -1.5  # Whisper's normalized log-mel of all-zero audio


class EncoderDecoderModelRunner:
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
        self.num_heads, self.head_dim = spec.decoder_heads, spec.head_dim
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
        self.vocab_size = spec.vocab_size
        self.vocab = WhisperVocab.from_folder(files.path, files.hf_config)
        self.rules = WhisperLogitsRules(self.vocab, self.device)
        self.alignment = AlignmentTracker(files.generation_config, spec)
        self.eos_token_ids: frozenset[int] = frozenset()
        logger.info("loaded %s (%s, %s) in %.2f s", files.source or files.path, self.arch,
                    str(self.dtype).removeprefix("torch."), time.perf_counter() - start)
        self.num_slots = self._num_cross_slots()
        self.max_num_reqs = self.num_slots
        self.max_num_tokens = config.scheduler_config.max_num_batched_tokens
        self.max_blocks_per_req = cdiv(max_model_len, self.block_size)
        self.batch = InputBatch(self.max_num_reqs, max_model_len, self.max_blocks_per_req,
                                self.vocab_size)
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        # [slots, 2, H, T_enc, Dh] per decoder layer; never zeroed (slots are written before use)
        self.cross_stores = [
            torch.empty((self.num_slots, 2, spec.decoder_heads, spec.max_source_positions,
                         spec.head_dim), dtype=self.dtype, device=self.device)
            for _ in range(self.num_layers)]
        self.states: dict[str, Any] = {}  # request id -> WhisperRowState
        self.no_speech: dict[str, float] = {}  # request id -> P(no speech), once its SOT is run
        self._arange = np.arange(max(self.max_num_tokens, self.max_num_reqs) + 1, dtype=np.int64)
        self._silence: torch.Tensor | None = None  # encoder states of a silent window

    # ---- set-up --------------------------------------------------------------------------------
    def _load_weights(self) -> None:
        if self.config.model_config.load_format == "dummy":
            init_dummy_weights(self.model, self.config.model_config.seed)
            return
        loaded = self.model.load_weights(iterate_safetensors(self.files.weight_files))
        missing = sorted({n for n, _ in self.model.named_parameters()} - loaded)
        if missing:
            raise ModelLoadError(f"checkpoint in {self.files.path} lacks weights: "
                                 + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))

    def _element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def cross_bytes_per_request(self) -> int:
        s = self.spec
        return 2 * s.max_source_positions * s.d_model * s.decoder_layers * self._element_size()

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

    def kv_bytes_per_block(self) -> int:
        return 2 * self.block_size * self.num_heads * self.head_dim * self._element_size() \
            * self.num_layers

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

    def remove_requests(self, req_ids: list[str]) -> None:
        """Drop these requests' rows now (failed requests; unknown ids are ignored)."""
        for rid in req_ids:
            self._remove(rid)

    def _update_states(self, out: SchedulerOutput, failed: dict[str, tuple[str, BaseException]]
                       ) -> list[tuple[int, np.ndarray]]:
        """Apply the scheduler's diff; returns (row, features) of requests that need encoding.
        A new request that cannot join (a bad parameter, say) goes to `failed`, with no row."""
        for rid in out.finished_req_ids:
            self._remove(rid)
        for new in out.scheduled_new_reqs:
            self._remove(new.req_id)
        to_encode: list[tuple[str, np.ndarray]] = []
        for new in out.scheduled_new_reqs:
            try:
                self._join(new)
            except Exception as exc:  # noqa: BLE001 - that request's failure, not the step's
                if is_device_error(exc):
                    raise
                self._remove(new.req_id)  # a row if batch.add got that far
                self.states.pop(new.req_id, None)
                self.alignment.drop(new.req_id)
                failed[new.req_id] = ("prepare", exc)
                continue
            to_encode.append((new.req_id, new.request.encoder_features))
        for cached in out.scheduled_cached_reqs:
            row = self.batch.index[cached.req_id]
            self.batch.num_computed_np[row] = cached.num_computed_tokens
            if cached.new_block_ids:
                self.batch.append_blocks(row, cached.new_block_ids)
        return [(self.batch.index[rid], feats) for rid, feats in to_encode]

    def _join(self, new: Any) -> None:
        """A new request's row: batch state, Whisper decoding state, alignment tracking."""
        if fault_injection.INJECTOR is not None:
            fault_injection.INJECTOR.check("prepare", new.req_id)
        req = new.request
        enc = req.encoder_input
        self.batch.add(new.req_id, new.token_ids, new.num_prompt_tokens,
                       new.num_computed_tokens, new.block_ids, req.sampling_params, self.device)
        prompt = list(req.prompt_token_ids)
        self.states[new.req_id] = row_state(self.vocab, prompt, enc.detect_language,
                                            list(enc.forced_token_ids))
        if enc.return_alignment:
            frames = enc.content_frames or self.spec.num_frames
            self.alignment.start(new.req_id, len(prompt), (frames + 1) // 2)

    def _encode(self, pending: list[tuple[int, np.ndarray]]) -> None:
        """Encode in batches of one window length. A short window (a realtime partial) costs in
        proportion to its frames; its encoder states continue with those of a silent window,
        which the decoder sees after the audio in a full window too."""
        by_len: dict[int, list[tuple[int, np.ndarray]]] = {}
        for row, feats in pending:
            by_len.setdefault(feats.shape[1], []).append((row, feats))
        for frames, group in by_len.items():
            for i in range(0, len(group), ENCODER_MAX_BATCH):
                chunk = group[i:i + ENCODER_MAX_BATCH]
                feats = torch.from_numpy(np.stack([f for _, f in chunk])).to(self.device,
                                                                              self.dtype)
                rows = torch.tensor([r for r, _ in chunk], device=self.device)
                states = self.model.encode(feats)  # [B, T, d]
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
        failed: dict[str, tuple[str, BaseException]] = {}
        pending = self._update_states(out, failed)
        batch = self.batch
        # rows in slot order, so the decode rows of a full batch are one contiguous store view
        req_ids = sorted((r for r in out.num_scheduled_tokens if r not in failed),
                         key=batch.index.__getitem__)
        if not req_ids:
            return ModelRunnerOutput({}, {}, failed=failed)
        if pending:
            self._encode(pending)
        rows = np.fromiter((batch.index[r] for r in req_ids), dtype=np.int64, count=len(req_ids))
        num_sched = np.fromiter((out.num_scheduled_tokens[r] for r in req_ids), dtype=np.int64,
                                count=len(req_ids))
        num_reqs, num_tokens = len(req_ids), int(num_sched.sum())
        qsl = np.zeros(num_reqs + 1, dtype=np.int32)
        np.cumsum(num_sched, out=qsl[1:])
        req_of_token = np.repeat(self._arange[:num_reqs], num_sched)
        computed = batch.num_computed_np[rows].astype(np.int64)
        positions = computed[req_of_token] + self._arange[:num_tokens] - qsl[req_of_token]
        input_ids = batch.token_ids_np[rows[req_of_token], positions].astype(np.int64)
        block_table_np = batch.block_table_np[rows]
        slots = (block_table_np[req_of_token, positions // self.block_size].astype(np.int64)
                 * self.block_size + positions % self.block_size)
        seq_lens = (computed + num_sched).astype(np.int32)
        dev = self.device
        slot_mapping = torch.from_numpy(slots).to(dev)
        common = CommonAttentionMetadata(
            query_start_loc_np=qsl, seq_lens_np=seq_lens,
            block_table=torch.from_numpy(block_table_np).to(dev), block_table_np=block_table_np,
            slot_mapping=slot_mapping, num_reqs=num_reqs, num_actual_tokens=num_tokens,
            max_query_len=int(num_sched.max()), max_seq_len=int(seq_lens.max()),
            block_size=self.block_size)
        attn_metadata = self.backend.build_metadata(common)
        cross = self._cross_metadata(rows, num_sched, qsl, req_ids, computed)
        hidden = self.model(torch.from_numpy(input_ids).to(dev),
                            torch.from_numpy(positions).to(dev), self.kv_caches, attn_metadata,
                            self.cross_stores, cross)
        self.alignment.collect(cross)
        self._no_speech(hidden, req_ids, computed, num_sched, qsl)
        done_idx = np.nonzero(seq_lens >= batch.num_tokens_np[rows])[0]
        if len(done_idx) == 0:
            return ModelRunnerOutput({}, {}, failed=failed)
        logits_idx = torch.from_numpy(qsl[1:][done_idx].astype(np.int64) - 1).to(dev)
        logits = self.model.compute_logits(hidden[logits_idx]).float()
        done_rows = rows[done_idx]
        done_ids = [req_ids[i] for i in done_idx]
        self.rules.apply(logits, [self.states[r] for r in done_ids],
                         [batch.output_ids(int(r)) for r in done_rows])
        result = self.sampler(logits, self._sampling_metadata(done_rows, done_ids))
        sampled, logprobs = batch.record_samples(
            [(rid, int(row)) for rid, row in zip(done_ids, done_rows)], result, failed)
        for rid in failed:
            self._remove(rid)
        return ModelRunnerOutput(sampled, logprobs, failed=failed)

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
            meta.decode_token_index = torch.from_numpy(qsl[dec].astype(np.int64)).to(dev)
            dec_rows = rows[dec]
            first = int(dec_rows[0])
            if np.array_equal(dec_rows, np.arange(first, first + len(dec_rows))):
                meta.decode_slots = slice(first, first + len(dec_rows))
            else:
                meta.decode_slots = torch.from_numpy(dec_rows).to(dev)
        for i in np.nonzero(num_sched > 1)[0]:
            meta.prefills.append((int(qsl[i]), int(qsl[i + 1]), int(rows[i])))
        self.alignment.plan(meta, req_ids, rows, qsl, computed, num_sched, dev)
        return meta

    def _sampling_metadata(self, rows: np.ndarray, req_ids: list[str]) -> SamplingMetadata:
        b, dev = self.batch, self.device
        temp_np = b.temperature_np[rows]
        top_k_np, top_p_np, min_p_np = b.top_k_np[rows], b.top_p_np[rows], b.min_p_np[rows]
        greedy = (temp_np < 1e-5) | (top_k_np == 1)
        temp_np = np.where(greedy, 0.0, temp_np).astype(np.float32)

        def tensor(arr: np.ndarray, used: bool) -> torch.Tensor | None:
            return torch.from_numpy(arr).to(dev) if used else None

        logits_inputs = None
        if b.needs_logits_inputs_np[rows].any():
            logits_inputs = build_logits_inputs(
                [b.params[r] for r in rows], [b.prompt_ids(r) for r in rows],
                [b.output_ids(r) for r in rows], self.eos_token_ids, self.vocab_size, dev)
        return SamplingMetadata(
            temperature=torch.from_numpy(temp_np).to(dev),
            top_p=tensor(top_p_np, bool((top_p_np < 1.0).any())),
            top_k=tensor(top_k_np.astype(np.int64), bool((top_k_np > 0).any())),
            min_p=tensor(min_p_np, bool((min_p_np > 0).any())),
            all_greedy=bool(greedy.all()), all_random=not bool(greedy.any()),
            generators={j: b.generators[r] for j, r in enumerate(req_ids) if r in b.generators},
            max_num_logprobs=int(b.num_logprobs_np[rows].max()), logits_inputs=logits_inputs)
