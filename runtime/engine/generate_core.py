"""GenerateEngineCore: text generation's admission and `step()` = schedule -> execute -> update
(engine-core process)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from fornax.runtime.config import EngineConfig
from fornax.runtime.engine.messages import EngineCoreOutput, EngineCoreRequest
from fornax.runtime.engine.scheduling_core import (
    SchedulingCoreMixin,
    allocate_kv_cache,
    runtime_info,
)
from fornax.runtime.errors import RequestError
from fornax.runtime.kv_cache.kv_cache_manager import KVCacheManager
from fornax.runtime.loaders.model_files import (
    ModelFiles,
    derive_max_model_len,
    files_for,
)
from fornax.runtime.sampling.request_prep import check_prompt, resolve_max_tokens
from fornax.runtime.scheduler.request import Request
from fornax.runtime.scheduler.scheduler import Scheduler

if TYPE_CHECKING:
    from fornax.runtime.scheduler.scheduler import SchedulerOutput
    from fornax.runtime.structured_output.grammar import StructuredOutputManager
    from fornax.runtime.worker.model_runner import ModelRunnerOutput

logger = logging.getLogger(__name__)


class GenerateEngineCore(SchedulingCoreMixin):
    """Owns the model runner, the KV-cache manager and the scheduler. Never dies of a bad request:
    bad requests are refused by `add_request` with a RequestError, and one that fails while being
    served fails alone (see SchedulingCoreMixin.step). It offers every capability of the contract
    (runtime/engine/contract.py): structured outputs, and sleep mode (it is its own SleepMode)."""

    structured: StructuredOutputManager

    def __init__(self, config: EngineConfig, files: ModelFiles | None = None) -> None:
        from fornax.runtime.worker.model_runner import ModelRunner  # torch stays out of import time

        self.config = config
        mc = config.model_config
        self.files = files or files_for(mc)
        self.max_model_len = derive_max_model_len(self.files.hf_config, mc.max_model_len)
        self.runner = ModelRunner(config, self.files, self.max_model_len)
        block_size = config.cache_config.block_size
        num_blocks = allocate_kv_cache(self.runner, block_size, self.max_model_len,
                                       "raise --kv-cache-memory or lower --max-model-len")
        self.compile_seconds = self.runner.warm_up()
        self.kv = KVCacheManager(num_blocks, block_size, self.max_model_len,
                                 config.cache_config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config, self.kv,
                                   self.max_model_len)
        self.scheduler.prefill_budget.fast_tokens = self.runner.fast_step_tokens()
        self.info = runtime_info(self.runner, self.files, num_blocks, block_size,
                                 self.max_model_len, config.device)
        self.runner.eos_token_ids = self.info.eos_token_ids
        from fornax.runtime.structured_output.grammar import StructuredOutputManager

        self.structured = StructuredOutputManager(self.files.tokenizer_path, self.info.vocab_size,
                                                  self.info.eos_token_ids,
                                                  config.structured_outputs_config)
        self.runner.structured = self.structured
        self.num_steps = 0
        from fornax.runtime.worker.sleep_mode import SleepState

        self._sleep = SleepState()
        self.sleep_mode = self
        logger.info("KV cache: %d blocks of %d tokens (%d tokens)", num_blocks, block_size,
                    self.info.kv_capacity_tokens)

    # ---- admission -----------------------------------------------------------------------------
    def validate_request(self, req: EngineCoreRequest) -> int:
        """Check a request against the model's limits; returns its resolved max_tokens."""
        if self._sleep.sleeping:
            raise RequestError("the engine is sleeping; POST /wake_up first", None)
        prompt = req.prompt_token_ids  # the front end checked it; the engine keeps its invariants
        check_prompt(prompt, self.max_model_len, self.info.vocab_size)
        if req.priority != 0 and self.config.scheduler_config.policy != "priority":
            raise RequestError("priority is only honoured with --scheduling-policy priority "
                               "(this server schedules first come, first served)", "priority")
        params = req.sampling_params  # validated once at the edge (API worker or LLM)
        if params.structured_outputs is not None:
            self.structured.compile(params.structured_outputs)  # 400 now if it cannot compile
        return resolve_max_tokens(params.max_tokens, None, len(prompt), self.max_model_len)

    def add_request(self, req: EngineCoreRequest) -> Request:
        max_tokens = self.validate_request(req)
        self.ensure_new_request_id(req.request_id)
        self.check_admit_faults(req.request_id)
        request = Request(
            request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids),
            sampling_params=req.sampling_params, eos_token_ids=self.info.eos_token_ids,
            priority=req.priority, cache_salt=req.cache_salt, share_group=req.parent_id,
            arrival_time=req.arrival_time or time.monotonic(), max_tokens=max_tokens)
        if req.sampling_params.structured_outputs is not None:
            request.grammar = self.structured.new_matcher(req.sampling_params.structured_outputs)
            request.grammar_active = not req.sampling_params.structured_outputs_after
        self.scheduler.add_request(request)
        return request

    # ---- the busy loop's body ------------------------------------------------------------------
    def _step(self) -> list[EngineCoreOutput]:
        """The shared step, timed from schedule to outputs: the scheduler's step-cost model
        learns the pure-decode step and the cost of a prompt token from it (prefill budget)."""
        start = time.perf_counter()
        ran = self._execute_scheduled()
        if ran is None:
            return []
        outputs = self._outputs(*ran)
        sched_out = ran[0]
        self.scheduler.prefill_budget.observe(sched_out.num_decode_reqs,
                                              sched_out.num_prefill_tokens,
                                              time.perf_counter() - start)
        return outputs

    def _outputs(self, sched_out: SchedulerOutput,
                 runner_out: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """The shared outputs, plus one for each request with prompt logprobs that sampled
        nothing this step (a prompt chunk): they report them from every chunk."""
        outputs = super()._outputs(sched_out, runner_out)
        if runner_out.prompt_logprobs:
            served = {o.request_id for o in outputs}
            requests = self.scheduler.requests
            for rid in runner_out.prompt_logprobs:
                request = requests.get(rid)
                if request is not None and rid not in served:
                    self.guarded_output(outputs, request, self._make_output, [], runner_out)
        return outputs

    def _make_output(self, request: Request, new_tokens: list[int],
                     runner_out: ModelRunnerOutput) -> EngineCoreOutput:
        out = super()._make_output(request, new_tokens, runner_out)
        prompt = runner_out.prompt_logprobs.get(request.request_id)
        if prompt is not None:
            start, entries = prompt
            skip = max(0, request.num_prompt_logprobs_sent - start)  # resent after preemption
            entries = entries[skip:]
            if entries:
                out.prompt_logprobs = entries
                out.prompt_logprobs_start = start + skip
                request.num_prompt_logprobs_sent = start + skip + len(entries)
        return out

    # ---- sleep mode (dev endpoints) -------------------------------------------------------
    @property
    def is_sleeping(self) -> bool:
        return self._sleep.sleeping

    def sleep(self, level: int = 1) -> None:
        """Free memory while idle; refused while requests are in flight."""
        from fornax.runtime.worker.sleep_mode import put_to_sleep

        if self.has_unfinished_requests():
            raise RequestError("cannot sleep while requests are in flight", "level")
        put_to_sleep(self.runner, self._sleep, level)
        self.kv.reset_prefix_cache()  # the cached KV is gone

    def wake_up(self) -> None:
        from fornax.runtime.worker.sleep_mode import wake_up

        wake_up(self.runner, self._sleep)
        self.scheduler.prefill_budget.fast_tokens = self.runner.fast_step_tokens()

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()
