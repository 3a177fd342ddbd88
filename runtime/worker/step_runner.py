"""PagedStepRunner: the step phases paged-KV runners share: join, inputs, sample (engine core).

A runner (ModelRunner for generation, EncoderDecoderModelRunner for Whisper) keeps its requests in
an InputBatch and runs one scheduled step as: `_update_states` (apply the scheduler's diff, join
new requests), `_prepare_inputs` (flatten the step's tokens on the host, copy them through pinned
staging buffers into persistent device buffers, build the attention metadata), its own forward,
then `_sample` (logits of the requests that get a token, grammar masks, the sampler, the tokens
appended to the batch). Subclasses add what their model needs around these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fornax.runtime.attention.backend import CommonAttentionMetadata
from fornax.runtime.engine import fault_injection
from fornax.runtime.engine.messages import TokenLogprobs
from fornax.runtime.engine.request_failure import is_device_error
from fornax.runtime.kv_cache.kv_cache_manager import cdiv
from fornax.runtime.sampling.logits_processors import build_logits_inputs
from fornax.runtime.sampling.sampler import Sampler, SamplingMetadata
from fornax.runtime.scheduler.scheduler import NewRequestData, SchedulerOutput
from fornax.runtime.structured_output.grammar import apply_bitmask, fill_bitmask
from fornax.runtime.worker.input_batch import InputBatch

Failed = dict[str, tuple[str, BaseException]]  # request id -> (stage, error)
_STAGED = ("input_ids", "positions", "slot_mapping")


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, int]  # request id -> token sampled at its last scheduled position
    logprobs: dict[str, TokenLogprobs]
    # request id -> (index of the first prompt token covered, logprobs of each covered token)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # request id -> (stage, error): requests this step could not serve; their rows are gone
    failed: Failed = field(default_factory=dict)


@dataclass
class StepInputs:
    """One step's flat batch: per request (in `req_ids` order) its row, scheduled and computed
    token counts and query start; the attention metadata over the device input buffers; which
    requests get a token (their whole known sequence is computed by this step)."""

    req_ids: list[str]
    rows: np.ndarray  # [R] int64 batch rows
    num_sched: np.ndarray  # [R] int64 tokens scheduled this step
    computed: np.ndarray  # [R] int64 tokens computed before it
    qsl: np.ndarray  # [R + 1] int32 query start locations in the flat token list
    seq_lens: np.ndarray  # [R] int32 computed + scheduled
    common: CommonAttentionMetadata
    done_idx: np.ndarray  # indices into req_ids of the requests sampled this step
    done_ids: list[str]

    @property
    def num_tokens(self) -> int:
        return int(self.qsl[-1])


class PagedStepRunner:
    """The shared state and phases of a step; the subclass sets the model, device, dtype, block
    size and backend, then calls `_init_step_state`, and implements `_join`."""

    config: Any  # EngineConfig
    device: torch.device
    dtype: torch.dtype
    block_size: int
    max_model_len: int
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    model: Any  # the architecture's model class (runtime/models/): forward, compute_logits
    backend: Any  # runtime/attention backend

    def _init_step_state(self, max_num_reqs: int, max_num_tokens: int) -> None:
        self.max_num_reqs = max_num_reqs
        self.max_num_tokens = max_num_tokens
        self.max_blocks_per_req = cdiv(self.max_model_len, self.block_size)
        self.batch = InputBatch(max_num_reqs, self.max_model_len, self.max_blocks_per_req,
                                self.vocab_size)
        self.sampler = Sampler()
        self._sampling_cache: tuple[tuple[int, bytes], SamplingMetadata] | None = None
        self.eos_token_ids: frozenset[int] = frozenset()  # set by the engine core
        self.structured: Any = None  # StructuredOutputManager, set by a core that has grammars
        self.kv_caches: list[torch.Tensor] = []
        # Persistent device buffers, reused every step (CUDA graphs need fixed addresses).
        dev = self.device
        self.input_ids = torch.zeros(max_num_tokens, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_num_tokens, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.zeros(max_num_tokens, dtype=torch.int64, device=dev)
        # On CUDA, host inputs go through pinned buffers so the copies above run asynchronously.
        self._pinned = dev.type == "cuda"
        if self._pinned:
            self._staging = {name: torch.zeros(max_num_tokens, dtype=torch.int64,
                                               pin_memory=True) for name in _STAGED}
            self._staged = torch.cuda.Event()  # the last step's copies out of the staging buffers
        self._arange = np.arange(max(max_num_tokens, max_num_reqs) + 1, dtype=np.int64)

    def kv_bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * elem * self.num_layers

    # ---- request state -------------------------------------------------------------------------
    def _remove(self, req_id: str) -> None:
        """Drop a request's row (unknown ids are ignored)."""
        self.batch.remove(req_id)

    def remove_requests(self, req_ids: list[str]) -> None:
        """Drop these requests' rows now (failed requests; unknown ids are ignored)."""
        for rid in req_ids:
            self._remove(rid)

    def _join(self, new: NewRequestData) -> None:
        """Give a newly scheduled request its row (and whatever else the runner keeps)."""
        raise NotImplementedError

    def _update_states(self, out: SchedulerOutput, failed: Failed) -> None:
        """Apply the scheduler's diff. A new request that cannot join (a bad parameter, say)
        fails alone, with no row: it goes into `failed` (stage "prepare")."""
        for rid in out.finished_req_ids:
            self._remove(rid)
        for new in out.scheduled_new_reqs:
            self._remove(new.req_id)
        for new in out.scheduled_new_reqs:
            try:
                if fault_injection.INJECTOR is not None:
                    fault_injection.INJECTOR.check("prepare", new.req_id)
                self._join(new)
            except Exception as exc:  # noqa: BLE001 - that request's failure, not the step's
                if is_device_error(exc):
                    raise
                self._remove(new.req_id)  # a row if it got that far
                failed[new.req_id] = ("prepare", exc)
        for cached in out.scheduled_cached_reqs:
            row = self.batch.index[cached.req_id]
            self.batch.num_computed_np[row] = cached.num_computed_tokens
            if cached.new_block_ids:
                self.batch.append_blocks(row, cached.new_block_ids)

    # ---- inputs --------------------------------------------------------------------------------
    def _prepare_inputs(self, out: SchedulerOutput, req_ids: list[str]) -> StepInputs:
        """Flatten the scheduled tokens of `req_ids` (token ids, positions, KV slots) into the
        device input buffers and build the step's attention metadata."""
        batch = self.batch
        rows = np.fromiter((batch.index[r] for r in req_ids), dtype=np.int64, count=len(req_ids))
        num_sched = np.fromiter((out.num_scheduled_tokens[r] for r in req_ids), dtype=np.int64,
                                count=len(req_ids))
        num_reqs, num_tokens = len(req_ids), int(num_sched.sum())
        qsl = np.zeros(num_reqs + 1, dtype=np.int32)
        np.cumsum(num_sched, out=qsl[1:])
        req_of_token = np.repeat(self._arange[:num_reqs], num_sched)
        computed = batch.num_computed_np[rows].astype(np.int64)
        positions = computed[req_of_token] + self._arange[:num_tokens] - qsl[req_of_token]
        input_ids = batch.token_ids_np[rows[req_of_token], positions]
        block_table_np = batch.block_table_np[rows]
        slots = (block_table_np[req_of_token, positions // self.block_size].astype(np.int64)
                 * self.block_size + positions % self.block_size)
        seq_lens = (computed + num_sched).astype(np.int32)

        if self._pinned:
            self._staged.synchronize()  # a step without sampled tokens had no sync of its own
        self._stage("input_ids", self.input_ids, input_ids)
        self._stage("positions", self.positions, positions)
        self._stage("slot_mapping", self.slot_mapping, slots)
        if self._pinned:
            self._staged.record()
        common = CommonAttentionMetadata(
            query_start_loc_np=qsl, seq_lens_np=seq_lens,
            block_table_np=block_table_np, slot_mapping=self.slot_mapping[:num_tokens],
            num_reqs=num_reqs, num_actual_tokens=num_tokens,
            max_query_len=int(num_sched.max()), max_seq_len=int(seq_lens.max()),
            block_size=self.block_size)
        done_idx = np.nonzero(seq_lens >= batch.num_tokens_np[rows])[0]
        return StepInputs(req_ids, rows, num_sched, computed, qsl, seq_lens, common, done_idx,
                          [req_ids[i] for i in done_idx])

    def _to_device(self, values: np.ndarray) -> torch.Tensor:
        """A small per-step host array on the device without a stream sync: on CUDA a copy from
        pageable memory first waits for the stream (the forward just queued), so it goes
        through torch's caching pinned allocator, which keeps the block until the copy ends."""
        host = torch.from_numpy(values)
        if not self._pinned:
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _stage(self, name: str, dst: torch.Tensor, values: np.ndarray) -> None:
        """Host int array -> the persistent int64 device buffer; through pinned memory on CUDA
        (the caller waited for the previous step's copies, so the staging buffer is free)."""
        n = len(values)
        if self._pinned:
            staged = self._staging[name][:n]
            staged.numpy()[:] = values
            dst[:n].copy_(staged, non_blocking=True)
        else:
            dst[:n].copy_(torch.from_numpy(values), non_blocking=True)

    # ---- sampling ------------------------------------------------------------------------------
    def _adjust_logits(self, logits: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """The runner's own logits rules for the sampled rows (none here)."""
        return logits

    def _sample(self, hidden: torch.Tensor, step: StepInputs, failed: Failed,
                bitmask_job: Any = None) -> tuple[dict[str, int], dict[str, TokenLogprobs]]:
        """Sample one token for each request in `step.done_idx` from its last position's hidden
        state and append it to the request's row; a request that fails here goes into `failed`
        and loses its row."""
        done_idx, done_ids = step.done_idx, step.done_ids
        done_rows = step.rows[done_idx]
        if len(done_idx) == step.num_tokens:  # all decodes: every position is sampled, in order
            last = hidden[:step.num_tokens]
        else:
            logits_idx = step.qsl[1:][done_idx].astype(np.int64) - 1
            last = hidden[self._to_device(logits_idx)]
        logits = self.model.compute_logits(last)
        if bitmask_job is not None:
            bitmask, constrained = self._finish_bitmask(bitmask_job, done_ids, failed)
            logits = logits.float()
            if constrained:
                apply_bitmask(logits, bitmask, constrained)
        logits = self._adjust_logits(logits, step)
        result = self.sampler(logits, self._sampling_metadata(done_rows, done_ids))
        sampled, logprobs = self.batch.record_samples(
            [(rid, int(row)) for rid, row in zip(done_ids, done_rows)], result, failed)
        for rid in failed:
            self._remove(rid)
        return sampled, logprobs

    def _start_bitmask(self, sampled_ids: list[str]) -> Any:
        """Fill the grammar bitmask of the rows about to be sampled, while the forward runs."""
        grammars = self.batch.grammars
        if not grammars:
            return None
        matchers = [grammars.get(rid) for rid in sampled_ids]
        matchers = [m if m is not None and self.batch.grammar_active(rid) else None
                    for rid, m in zip(sampled_ids, matchers)]
        constrained = [j for j, m in enumerate(matchers) if m is not None]
        if not constrained:
            return None
        return self.structured.submit(fill_bitmask, matchers, self.vocab_size), constrained, \
            matchers

    def _finish_bitmask(self, job: Any, sampled_ids: list[str], failed: Failed
                        ) -> tuple[torch.Tensor, list[int]]:
        """The filled bitmask and its constrained rows. If filling raised, fill again row by row:
        a row whose grammar raises fails its request alone (stage "grammar"), unconstrained."""
        future, constrained, matchers = job
        try:
            return future.result(), constrained
        except Exception as exc:  # noqa: BLE001 - pinned on the rows below
            if is_device_error(exc):
                raise
        bitmask = fill_bitmask([None] * len(matchers), self.vocab_size)  # all tokens allowed
        for j in constrained:
            try:
                bitmask[j] = fill_bitmask([matchers[j]], self.vocab_size)[0]
            except Exception as exc:  # noqa: BLE001 - that request's failure, not the step's
                failed[sampled_ids[j]] = ("grammar", exc)
        return bitmask, [j for j in constrained if sampled_ids[j] not in failed]

    def _sampling_metadata(self, rows: np.ndarray, req_ids: list[str]) -> SamplingMetadata:
        """The sampled rows' settings as the sampler reads them. Without penalties or other
        logits inputs (which change with every token) it depends only on which rows are sampled,
        so a run of decode steps over the same rows reuses it."""
        b = self.batch
        key = (b.version, rows.tobytes())
        cached = self._sampling_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        meta = self._build_sampling_metadata(rows, req_ids)
        self._sampling_cache = (key, meta) if meta.logits_inputs is None else None
        return meta

    def _build_sampling_metadata(self, rows: np.ndarray, req_ids: list[str]) -> SamplingMetadata:
        b = self.batch
        temp_np = b.temperature_np[rows]
        top_k_np, top_p_np, min_p_np = b.top_k_np[rows], b.top_p_np[rows], b.min_p_np[rows]
        greedy = temp_np < 1e-5
        greedy |= top_k_np == 1
        temp_np = np.where(greedy, 0.0, temp_np).astype(np.float32)
        dev = self.device

        def tensor(arr: np.ndarray, used: bool) -> torch.Tensor | None:
            return self._to_device(arr) if used else None

        gens = {j: b.generators[r] for j, r in enumerate(req_ids) if r in b.generators}
        logits_inputs = None
        if b.needs_logits_inputs_np[rows].any():
            logits_inputs = build_logits_inputs(
                [b.params[r] for r in rows], [b.prompt_ids(r) for r in rows],
                [b.output_ids(r) for r in rows], self.eos_token_ids, self.vocab_size, dev)
        return SamplingMetadata(
            temperature=self._to_device(temp_np),
            top_p=tensor(top_p_np, bool((top_p_np < 1.0).any())),
            top_k=tensor(top_k_np.astype(np.int64), bool((top_k_np > 0).any())),
            min_p=tensor(min_p_np, bool((min_p_np > 0).any())),
            all_greedy=bool(greedy.all()), all_random=not bool(greedy.any()),
            generators=gens, max_num_logprobs=int(b.num_logprobs_np[rows].max()),
            logits_inputs=logits_inputs)
