"""ModelRunner: loads the model, owns the KV cache and runs one scheduled step (engine core)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fornax.runtime.engine import fault_injection
from fornax.runtime.attention.backend import CommonAttentionMetadata, make_attention_backend
from fornax.runtime.config import EngineConfig
from fornax.runtime.errors import ModelLoadError
from fornax.runtime.engine.messages import TokenLogprobs
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
from fornax.runtime.kernels.fused_ops import enable_fused_ops, fused_ops_supported
from fornax.runtime.kernels.packing import pack_linear_weights, packing_supported
from fornax.runtime.models.registry import resolve_architecture
from fornax.runtime.engine.request_failure import is_device_error
from fornax.runtime.sampling.sampler import Sampler, SamplingMetadata
from fornax.runtime.scheduler.scheduler import SchedulerOutput
from fornax.runtime.structured_output.grammar import apply_bitmask, fill_bitmask

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DEFAULT_CPU_KV_BYTES = 2 * 1024**3


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, int]  # request id -> token sampled at its last scheduled position
    logprobs: dict[str, TokenLogprobs]
    # request id -> (index of the first prompt token covered, logprobs of each covered token)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # request id -> (stage, error): requests this step could not serve; their rows are gone
    failed: dict[str, tuple[str, BaseException]] = field(default_factory=dict)


def resolve_dtype(requested: str, hf_config: dict, device: torch.device) -> torch.dtype:
    """'auto' takes the checkpoint's dtype (float16 becomes float32 on CPU, where it is slow)."""
    if requested != "auto":
        return _TORCH_DTYPES[requested]
    name = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32")
    dtype = _TORCH_DTYPES.get(name, torch.float32)
    if device.type == "cpu" and dtype == torch.float16:
        return torch.float32
    return dtype


class ModelRunner:
    """Persistent host state (InputBatch) and device buffers; `execute_model` runs one step."""

    def __init__(self, config: EngineConfig, files: ModelFiles, max_model_len: int) -> None:
        self.config = config
        self.files = files
        self.device = torch.device(config.device)
        self.max_model_len = max_model_len
        self.block_size = config.cache_config.block_size
        self.dtype = resolve_dtype(config.model_config.dtype, files.hf_config, self.device)
        self.arch, model_cls = resolve_architecture(files.hf_config)
        hf = files.hf_config
        num_heads = int(hf["num_attention_heads"])
        self.num_kv_heads = int(hf.get("num_key_value_heads") or num_heads)
        self.head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // num_heads)
        self.num_layers = int(hf["num_hidden_layers"])
        self.backend = make_attention_backend(
            config.attention_backend, num_heads=num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, block_size=self.block_size, dtype=self.dtype,
            device=self.device)
        start = time.perf_counter()
        torch.manual_seed(config.model_config.seed)
        with torch.device(self.device):
            self.model = model_cls(hf, self.arch, self.backend).to(self.dtype)
        self._load_weights()
        self.model.eval()
        # Shapes by parameter identity, so sleep level 2 can release and later re-create them.
        self.param_shapes = {id(p): tuple(p.shape) for p in self.model.parameters()}
        self.vocab_size = int(hf["vocab_size"])
        self.eos_token_ids: frozenset[int] = frozenset()  # set by the engine core
        self.structured: Any = None  # StructuredOutputManager, set by the engine core
        logger.info("loaded %s (%s, %s) in %.2f s", files.source or files.path, self.arch,
                    str(self.dtype).removeprefix("torch."), time.perf_counter() - start)
        sched = config.scheduler_config
        self.max_num_reqs = sched.max_num_seqs
        self.max_num_tokens = sched.max_num_batched_tokens
        self.max_blocks_per_req = cdiv(max_model_len, self.block_size)
        self.batch = InputBatch(self.max_num_reqs, max_model_len, self.max_blocks_per_req,
                                self.vocab_size)
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        # Persistent device buffers, reused every step (CUDA graphs need fixed addresses).
        self.input_ids = torch.zeros(self.max_num_tokens, dtype=torch.int64, device=self.device)
        self.positions = torch.zeros(self.max_num_tokens, dtype=torch.int64, device=self.device)
        self.slot_mapping = torch.zeros(self.max_num_tokens, dtype=torch.int64, device=self.device)
        # On CUDA, host inputs go through pinned buffers so the copies above run asynchronously.
        self._pinned = self.device.type == "cuda"
        if self._pinned:
            self._staging = {name: torch.zeros(self.max_num_tokens, dtype=torch.int64,
                                               pin_memory=True)
                             for name in ("input_ids", "positions", "slot_mapping")}
            self._staged = torch.cuda.Event()  # the last step's copies out of the staging buffers
        self.graph_runner: Any = None  # graphs/cuda_graphs.CudaGraphRunner once captured
        self._arange = np.arange(max(self.max_num_tokens, self.max_num_reqs) + 1, dtype=np.int64)
        eager = config.compilation_config.enforce_eager
        self.compiled = not (eager if eager is not None else self.device.type == "cpu")
        self.forward_fn = self.model.forward
        if self.compiled:
            from fornax.graphs.compile import compile_model_forward

            self.forward_fn = compile_model_forward(self.model)
        self._pack_weights()

    # ---- set-up --------------------------------------------------------------------------------
    def _load_weights(self) -> None:
        if self.config.model_config.load_format == "dummy":
            init_dummy_weights(self.model, self.config.model_config.seed)
            return
        loaded = self.model.load_weights(iterate_safetensors(self.files.weight_files))
        expected = {name for name, _ in self.model.named_parameters()}
        missing = sorted(expected - loaded)
        if missing:
            raise ModelLoadError(f"checkpoint in {self.files.path} lacks weights: "
                                 + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))

    def reload_weights(self) -> None:
        """Load the checkpoint again into the existing parameters (after sleep level 2)."""
        with torch.inference_mode(False), torch.no_grad():
            self._load_weights()
        self._pack_weights()

    def _pack_weights(self) -> None:
        """bf16 on CPU, eager: oneDNN pre-packed weights and fused C norm/activation kernels
        (compiled graphs trace the plain torch bodies instead)."""
        if self.compiled:
            return
        if packing_supported(self.device, self.dtype):
            pack_linear_weights(self.model)
        if fused_ops_supported(self.device, self.dtype):
            enable_fused_ops(self.model)

    def kv_bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * elem * self.num_layers

    def determine_num_blocks(self) -> int:
        """KV capacity: an explicit block count or byte budget, else a device-specific default."""
        cache = self.config.cache_config
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        per_block = self.kv_bytes_per_block()
        if cache.kv_cache_memory_bytes is not None:
            budget = cache.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            from fornax.runtime.worker.gpu_memory import gpu_kv_budget

            budget = gpu_kv_budget(self, cache.gpu_memory_utilization, self._wants_graphs())
        else:  # every sequence slot at full length, capped at 2 GiB of host memory
            budget = full_length_bytes(self.max_num_reqs, self.max_blocks_per_req, per_block,
                                       _DEFAULT_CPU_KV_BYTES)
        return blocks_in_budget(budget, per_block)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        recapture = self.graph_runner is not None  # graphs read the old caches' addresses
        self.graph_runner = None
        self.kv_caches = allocate_layer_caches(self.backend.kv_cache_shape(num_blocks),
                                               self.num_layers, self.dtype, self.device)
        if recapture:
            self._capture_graphs()

    def _wants_graphs(self) -> bool:
        """CUDA graphs: on a GPU, compiled, not turned off, and a capturable attention backend."""
        return (self.device.type == "cuda" and self.compiled
                and self.config.compilation_config.use_cuda_graphs
                and self.backend.supports_cuda_graphs)

    def _capture_graphs(self) -> float:
        from fornax.graphs.buckets import capture_sizes
        from fornax.graphs.cuda_graphs import CudaGraphRunner

        cc = self.config.compilation_config
        sizes = capture_sizes(cc.cuda_graph_sizes, self.max_num_reqs, cc.max_capture_size)
        sizes = [s for s in sizes if s <= self.max_num_tokens]
        runner = CudaGraphRunner(self.forward_fn, self.backend, sizes, self.input_ids,
                                 self.positions, self.slot_mapping, self.kv_caches,
                                 self.max_blocks_per_req, self.block_size)
        seconds = runner.capture()
        self.graph_runner = runner
        return seconds

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Run dummy prefill and decode shapes so compilation happens before serving."""
        if not self.compiled:
            return 0.0
        start = time.perf_counter()
        logger.info("compiling the model forward (torch.compile, cached across restarts)...")
        for num_reqs, q_len in ((1, min(8, self.max_num_tokens)), (1, 1), (2, 1)):
            self._dummy_forward(num_reqs, q_len)
        elapsed = time.perf_counter() - start
        logger.info("compiled in %.1f s", elapsed)
        if self._wants_graphs():
            elapsed += self._capture_graphs()
        return elapsed

    def _dummy_forward(self, num_reqs: int, q_len: int) -> torch.Tensor:
        """A forward over fake requests whose K/V all land in the reserved null block."""
        num_tokens = num_reqs * q_len
        qsl = (np.arange(num_reqs + 1) * q_len).astype(np.int32)
        seq_lens = np.full(num_reqs, q_len, dtype=np.int32)
        block_table_np = np.zeros((num_reqs, self.max_blocks_per_req), dtype=np.int32)
        self.input_ids[:num_tokens].zero_()
        self.positions[:num_tokens].copy_(torch.arange(q_len).repeat(num_reqs))
        self.slot_mapping[:num_tokens].zero_()
        common = CommonAttentionMetadata(
            query_start_loc_np=qsl, seq_lens_np=seq_lens,
            block_table=torch.from_numpy(block_table_np).to(self.device),
            block_table_np=block_table_np, slot_mapping=self.slot_mapping[:num_tokens],
            num_reqs=num_reqs, num_actual_tokens=num_tokens, max_query_len=q_len,
            max_seq_len=q_len, block_size=self.block_size)
        meta = self.backend.build_metadata(common)
        return self.forward_fn(self.input_ids[:num_tokens], self.positions[:num_tokens],
                               self.kv_caches, meta)

    # ---- one step ------------------------------------------------------------------------------
    def remove_requests(self, req_ids: list[str]) -> None:
        """Drop these requests' rows now (failed requests; unknown ids are ignored)."""
        for rid in req_ids:
            self.batch.remove(rid)

    def _update_states(self, out: SchedulerOutput) -> dict[str, tuple[str, BaseException]]:
        """Apply the scheduler's diff; returns the new requests that could not join the batch
        (a bad parameter, say): they fail alone, with no row."""
        failed: dict[str, tuple[str, BaseException]] = {}
        for rid in out.finished_req_ids:
            self.batch.remove(rid)
        for new in out.scheduled_new_reqs:
            self.batch.remove(new.req_id)
            try:
                if fault_injection.INJECTOR is not None:
                    fault_injection.INJECTOR.check("prepare", new.req_id)
                self.batch.add(new.req_id, new.token_ids, new.num_prompt_tokens,
                               new.num_computed_tokens, new.block_ids,
                               new.request.sampling_params, self.device, new.request.grammar,
                               new.request)
            except Exception as exc:  # noqa: BLE001 - that request's failure, not the step's
                if is_device_error(exc):
                    raise
                self.batch.remove(new.req_id)
                failed[new.req_id] = ("prepare", exc)
        for cached in out.scheduled_cached_reqs:
            row = self.batch.index[cached.req_id]
            self.batch.num_computed_np[row] = cached.num_computed_tokens
            if cached.new_block_ids:
                self.batch.append_blocks(row, cached.new_block_ids)
        return failed

    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        failed = self._update_states(out)
        req_ids = list(out.num_scheduled_tokens)
        if failed:
            req_ids = [rid for rid in req_ids if rid not in failed]
        if not req_ids:
            return ModelRunnerOutput({}, {}, failed=failed)
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
        token_rows = rows[req_of_token]
        input_ids = batch.token_ids_np[token_rows, positions]
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
            block_table=torch.from_numpy(block_table_np).to(self.device, non_blocking=True),
            block_table_np=block_table_np, slot_mapping=self.slot_mapping[:num_tokens],
            num_reqs=num_reqs, num_actual_tokens=num_tokens,
            max_query_len=int(num_sched.max()), max_seq_len=int(seq_lens.max()),
            block_size=self.block_size)
        # Only requests whose whole known sequence is now computed get a token.
        done = seq_lens >= batch.num_tokens_np[rows]
        done_idx = np.nonzero(done)[0]
        done_ids = [req_ids[i] for i in done_idx]
        bitmask_job = self._start_bitmask(done_ids)
        graphs = self.graph_runner
        if graphs is not None and graphs.can_replay(num_tokens, num_reqs):
            hidden = graphs.replay(common)
        else:
            hidden = self.forward_fn(self.input_ids[:num_tokens], self.positions[:num_tokens],
                                     self.kv_caches, self.backend.build_metadata(common))
        prompt_lps = {}
        if (batch.num_prompt_logprobs_np[rows] >= 0).any():
            prompt_lps = self._prompt_logprobs(hidden, req_ids, rows, computed, num_sched, qsl)

        if len(done_idx) == 0:
            return ModelRunnerOutput({}, {}, prompt_lps, failed)
        logits_idx = torch.from_numpy(qsl[1:][done_idx].astype(np.int64) - 1).to(self.device)
        logits = self.model.compute_logits(hidden[logits_idx])
        if bitmask_job is not None:
            bitmask, constrained = self._finish_bitmask(bitmask_job, done_ids, failed)
            logits = logits.float()
            if constrained:
                apply_bitmask(logits, bitmask, constrained)
        meta = self._sampling_metadata(rows[done_idx], done_ids)
        result = self.sampler(logits, meta)
        done = [(req_ids[i], int(rows[i])) for i in done_idx]
        sampled, logprobs = batch.record_samples(done, result, failed)
        for rid in failed:
            batch.remove(rid)
        return ModelRunnerOutput(sampled, logprobs, prompt_lps, failed)

    def _stage(self, name: str, dst: torch.Tensor, values: np.ndarray) -> None:
        """Host int64 array -> the persistent device buffer; through pinned memory on CUDA (the
        caller waited for the previous step's copies, so the staging buffer is free)."""
        n = len(values)
        if self._pinned:
            staged = self._staging[name][:n]
            staged.numpy()[:] = values
            dst[:n].copy_(staged, non_blocking=True)
        else:
            dst[:n].copy_(torch.from_numpy(values), non_blocking=True)

    def _prompt_logprobs(self, hidden: torch.Tensor, req_ids: list[str], rows: np.ndarray,
                         computed: np.ndarray, num_sched: np.ndarray, qsl: np.ndarray
                         ) -> dict[str, tuple[int, list[TokenLogprobs]]]:
        """Logprob of each next prompt token (and the top-k) at the scheduled prompt positions."""
        out: dict[str, tuple[int, list[TokenLogprobs]]] = {}
        batch = self.batch
        for i, rid in enumerate(req_ids):
            row = int(rows[i])
            k = int(batch.num_prompt_logprobs_np[row])
            if k < 0:
                continue
            start = int(computed[i])
            end = min(start + int(num_sched[i]), int(batch.num_prompt_np[row]) - 1)
            if end <= start:
                continue
            idx = torch.arange(int(qsl[i]), int(qsl[i]) + end - start, device=self.device)
            lps = torch.log_softmax(self.model.compute_logits(hidden[idx]).float(), dim=-1)
            targets = torch.from_numpy(
                batch.token_ids_np[row, start + 1:end + 1].astype(np.int64)).to(self.device)
            chosen = lps.gather(1, targets.unsqueeze(1))
            ranks = ((lps > chosen).sum(dim=-1) + 1).tolist()
            ids = targets.unsqueeze(1)
            vals = chosen
            if k > 0:
                top_v, top_i = lps.topk(k, dim=-1)
                ids, vals = torch.cat([ids, top_i], 1), torch.cat([vals, top_v], 1)
            entries = [TokenLogprobs(a, b, r)
                       for a, b, r in zip(ids.tolist(), vals.tolist(), ranks)]
            out[rid] = (start + 1, entries)
        return out

    def _start_bitmask(self, sampled_ids: list[str]):
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

    def _finish_bitmask(self, job: Any, sampled_ids: list[str],
                        failed: dict[str, tuple[str, BaseException]]
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
        b = self.batch
        temp_np = b.temperature_np[rows]
        top_k_np, top_p_np, min_p_np = b.top_k_np[rows], b.top_p_np[rows], b.min_p_np[rows]
        greedy = temp_np < 1e-5
        greedy |= top_k_np == 1
        temp_np = np.where(greedy, 0.0, temp_np).astype(np.float32)
        dev = self.device

        def tensor(arr: np.ndarray, used: bool) -> torch.Tensor | None:
            return torch.from_numpy(arr).to(dev, non_blocking=True) if used else None

        gens = {j: b.generators[r] for j, r in enumerate(req_ids) if r in b.generators}
        logits_inputs = None
        if b.needs_logits_inputs_np[rows].any():
            logits_inputs = build_logits_inputs(
                [b.params[r] for r in rows], [b.prompt_ids(r) for r in rows],
                [b.output_ids(r) for r in rows], self.eos_token_ids, self.vocab_size, dev)
        return SamplingMetadata(
            temperature=torch.from_numpy(temp_np).to(dev, non_blocking=True),
            top_p=tensor(top_p_np, bool((top_p_np < 1.0).any())),
            top_k=tensor(top_k_np.astype(np.int64), bool((top_k_np > 0).any())),
            min_p=tensor(min_p_np, bool((min_p_np > 0).any())),
            all_greedy=bool(greedy.all()), all_random=not bool(greedy.any()),
            generators=gens, max_num_logprobs=int(b.num_logprobs_np[rows].max()),
            logits_inputs=logits_inputs)
