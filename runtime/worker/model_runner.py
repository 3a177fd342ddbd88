"""ModelRunner: loads the model, owns the KV cache and runs one scheduled step (engine core)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from fornax.runtime.attention.backend import CommonAttentionMetadata, make_attention_backend
from fornax.runtime.config import EngineConfig
from fornax.runtime.engine.messages import TokenLogprobs
from fornax.runtime.kernels.fused_decode import enable_fused_decode
from fornax.runtime.kernels.fused_ops import enable_fused_ops, fused_ops_supported
from fornax.runtime.kernels.packing import pack_linear_weights, packing_supported
from fornax.runtime.kv_cache.sizing import (
    allocate_layer_caches,
    blocks_in_budget,
    full_length_bytes,
)
from fornax.runtime.loaders.model_files import ModelFiles
from fornax.runtime.loaders.weights import load_model_weights, resolve_dtype
from fornax.runtime.models.registry import resolve_architecture
from fornax.runtime.scheduler.scheduler import NewRequestData, SchedulerOutput
from fornax.runtime.worker.step_runner import ModelRunnerOutput, PagedStepRunner

__all__ = ["ModelRunner", "ModelRunnerOutput"]

logger = logging.getLogger(__name__)

_DEFAULT_CPU_KV_BYTES = 2 * 1024**3


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created in `dtype` directly: built in float32 and then cast, a model would
    briefly hold both copies (1.5x its bf16 size), and the freed float32 pages stay in the
    process (glibc keeps them), though the loader overwrites every value. The model's float32
    tables (rotary cos/sin) name their dtype explicitly."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ModelRunner(PagedStepRunner):
    """A causal LM over the paged KV cache; `execute_model` runs one step (the shared phases in
    PagedStepRunner, plus prompt logprobs, torch.compile and CUDA graphs)."""

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
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = model_cls(hf, self.arch, self.backend).to(self.dtype)
        # Shapes by parameter identity, so sleep level 2 can release and later re-create them:
        # taken before loading, which empties the dense tensor of a weight kept quantized.
        self.param_shapes = {id(p): tuple(p.shape) for p in self.model.parameters()}
        self._load_weights()
        self.model.eval()
        self.vocab_size = int(hf["vocab_size"])
        logger.info("loaded %s (%s, %s) in %.2f s", files.source or files.path, self.arch,
                    str(self.dtype).removeprefix("torch."), time.perf_counter() - start)
        sched = config.scheduler_config
        self._init_step_state(sched.max_num_seqs, sched.max_num_batched_tokens)
        self.graph_runner: Any = None  # graphs/cuda_graphs.CudaGraphRunner once captured
        eager = config.compilation_config.enforce_eager
        self.compiled = not (eager if eager is not None else self.device.type == "cpu")
        self.forward_fn = self.model.forward
        if self.compiled:
            from fornax.graphs.compile import compile_model_forward

            self.forward_fn = compile_model_forward(self.model)
        self._pack_weights()

    # ---- set-up --------------------------------------------------------------------------------
    def _load_weights(self) -> None:
        load_model_weights(self.model, self.model.checkpoint_name, self.files,
                           self.config.model_config, self.arch)

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
            enable_fused_decode(self.model, self.backend)

    def fast_step_tokens(self) -> int:
        """The most tokens a step with prompt chunks may have and still run the layer stack in
        one fused C call (kernels/fused_decode.py; 0: no such path), for the prefill budget."""
        decoder = getattr(self.model, "model", None)
        fused = getattr(decoder, "fused_decode", None)
        return fused.max_rows if fused is not None and fused.prompt_rows else 0

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
            block_table_np=block_table_np, slot_mapping=self.slot_mapping[:num_tokens],
            num_reqs=num_reqs, num_actual_tokens=num_tokens, max_query_len=q_len,
            max_seq_len=q_len, block_size=self.block_size)
        meta = self.backend.build_metadata(common)
        return self.forward_fn(self.input_ids[:num_tokens], self.positions[:num_tokens],
                               self.kv_caches, meta)

    # ---- one step ------------------------------------------------------------------------------
    def _join(self, new: NewRequestData) -> None:
        self.batch.add(new.req_id, new.token_ids, new.num_prompt_tokens, new.num_computed_tokens,
                       new.block_ids, new.request.sampling_params, self.device,
                       new.request.grammar, new.request)

    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """One step: the scheduler's diff, inputs, forward (a CUDA graph when one fits),
        prompt logprobs, then a token for each request whose known sequence is computed."""
        failed: dict[str, tuple[str, BaseException]] = {}
        self._update_states(out, failed)
        req_ids = [rid for rid in out.num_scheduled_tokens if rid not in failed]
        if not req_ids:
            return ModelRunnerOutput({}, {}, failed=failed)
        step = self._prepare_inputs(out, req_ids)
        bitmask_job = self._start_bitmask(step.done_ids)
        num_tokens, common = step.num_tokens, step.common
        graphs = self.graph_runner
        if graphs is not None and graphs.can_replay(num_tokens, common.num_reqs):
            hidden = graphs.replay(common)
        else:
            hidden = self.forward_fn(self.input_ids[:num_tokens], self.positions[:num_tokens],
                                     self.kv_caches, self.backend.build_metadata(common))
        prompt_lps = {}
        if (self.batch.num_prompt_logprobs_np[step.rows] >= 0).any():
            prompt_lps = self._prompt_logprobs(hidden, req_ids, step.rows, step.computed,
                                               step.num_sched, step.qsl)
        if len(step.done_idx) == 0:
            return ModelRunnerOutput({}, {}, prompt_lps, failed)
        sampled, logprobs = self._sample(hidden, step, failed, bitmask_job)
        return ModelRunnerOutput(sampled, logprobs, prompt_lps, failed)

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
