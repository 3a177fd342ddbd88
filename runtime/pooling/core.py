"""PoolingEngineCore: batches embedding / classify / score requests into forwards (engine core).

It satisfies the engine contract (runtime/engine/contract.py), so the engine-core process and the
offline `LLM` run it like the others. A pooling request is one whole prompt that finishes in the
step that runs it: no KV cache, no chunking, no decode.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

from fornax.runtime.config import EngineConfig
from fornax.runtime.engine import fault_injection
from fornax.runtime.engine.contract import EngineRuntimeInfo, RunnerType
from fornax.runtime.engine.messages import (
    EngineCoreOutput,
    EngineCoreRequest,
    PoolingModelInfo,
    PoolingOutput,
    PoolingParams,
)
from fornax.runtime.engine.request_failure import RequestFailure
from fornax.runtime.engine.scheduling_core import SchedulingCoreMixin
from fornax.runtime.errors import RequestError
from fornax.runtime.loaders.model_files import ModelFiles, files_for
from fornax.runtime.pooling.config import parse_pooler_config, pooling_model_info
from fornax.runtime.sampling.request_prep import check_prompt_ids

logger = logging.getLogger(__name__)


@dataclass
class PoolingRequest:
    """One scheduled sequence: its tokens, segment ids and what to return (the runner's input
    as it is)."""

    request_id: str
    token_ids: list[int]
    token_type_ids: list[int] | None
    params: PoolingParams
    priority: int
    arrival_time: float
    num_cached_tokens = 0  # no KV cache: nothing is ever cached

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.token_ids)


class PoolingScheduler:
    """Waiting requests in policy order; each step takes as many as the token budget holds."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, policy: str) -> None:
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.policy = policy
        self.requests: dict[str, PoolingRequest] = {}
        self._heap: list[tuple[Any, ...]] = []
        self._order = itertools.count()
        self.num_waiting_prompt_tokens = 0  # of `requests` (--max-num-queued-tokens counts these)
        self.num_running = 0
        self.num_preemptions = 0
        self.failures: list[RequestFailure] = []  # taken by the engine core after each step

    @property
    def num_waiting(self) -> int:
        return len(self.requests)

    def add_request(self, request: PoolingRequest) -> None:
        self.requests[request.request_id] = request
        self.num_waiting_prompt_tokens += request.num_prompt_tokens
        key = (request.priority, request.arrival_time) if self.policy == "priority" else ()
        heapq.heappush(self._heap, (*key, next(self._order), request.request_id))

    def abort_requests(self, request_ids: list[str]) -> list[PoolingRequest]:
        # left in the heap; skipped when popped
        aborted = [r for r in (self._forget(rid) for rid in request_ids) if r is not None]
        return aborted

    def _forget(self, request_id: str) -> PoolingRequest | None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.num_waiting_prompt_tokens -= request.num_prompt_tokens
        return request

    def fail_request(self, request: PoolingRequest, stage: str, error: BaseException,
                     batch: bool = False) -> None:
        """End a request that failed while being served; `failures` keeps the record."""
        if not batch:
            logger.error("request %s failed at stage %s", request.request_id, stage,
                         exc_info=error)
        self._forget(request.request_id)  # left in the heap; skipped when popped
        self.failures.append(RequestFailure(request.request_id, stage, error, batch,
                                            request.num_prompt_tokens))

    def schedule(self) -> list[PoolingRequest]:
        batch: list[PoolingRequest] = []
        tokens = 0
        while self._heap and len(batch) < self.max_num_seqs:
            rid = self._heap[0][-1]
            request = self.requests.get(rid)
            if request is None:  # aborted while waiting
                heapq.heappop(self._heap)
                continue
            if batch and tokens + request.num_prompt_tokens > self.token_budget:
                break
            heapq.heappop(self._heap)
            self._forget(rid)
            try:
                if fault_injection.INJECTOR is not None:
                    fault_injection.INJECTOR.check("schedule", rid)
            except Exception as exc:  # noqa: BLE001 - that request's failure, not the engine's
                self.fail_request(request, "schedule", exc)
                continue
            batch.append(request)
            tokens += request.num_prompt_tokens
        return batch

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)


class PoolingEngineCore(SchedulingCoreMixin):
    """Owns the pooling model runner and its scheduler; never dies of a bad request (one that
    fails while being served fails alone, see SchedulingCoreMixin.step)."""

    runner_type: RunnerType = "pooling"
    pooling_info: PoolingModelInfo

    def __init__(self, config: EngineConfig, files: ModelFiles | None = None) -> None:
        from fornax.runtime.pooling.runner import PoolingModelRunner  # torch stays out of import

        self.config = config
        mc = config.model_config
        self.files = files or files_for(mc)
        self.pooling_info = pooling_model_info(self.files.hf_config, self.files.path,
                                               mc.max_model_len,
                                               parse_pooler_config(mc.pooler_config))
        self.max_model_len = self.pooling_info.max_model_len
        self.runner = PoolingModelRunner(config, self.files, self.pooling_info)
        sched = config.scheduler_config
        budget = max(sched.max_num_batched_tokens, self.max_model_len)  # a prompt fits one step
        self.scheduler = PoolingScheduler(sched.max_num_seqs, budget, sched.policy)
        self.info = EngineRuntimeInfo(
            max_model_len=self.max_model_len, vocab_size=self.runner.vocab_size,
            architecture=self.pooling_info.architecture,
            dtype=str(self.runner.dtype).removeprefix("torch."), device=config.device)
        self.num_steps = 0
        self.num_pooled = 0
        logger.info("pooling runner: %s (%s), tasks %s, max_model_len %d, %d tokens per step",
                    self.pooling_info.architecture, self.pooling_info.head,
                    ", ".join(self.pooling_info.tasks), self.max_model_len, budget)

    # ---- admission -----------------------------------------------------------------------------
    def validate_request(self, req: EngineCoreRequest) -> PoolingParams:
        """Check a request against the model; returns its pooling parameters."""
        params = req.pooling_params
        if params is None:
            raise RequestError(
                f"this server runs a pooling model ({self.pooling_info.architecture}): it serves "
                "embeddings, classification and scores, not text generation", "model")
        if params.task not in self.pooling_info.tasks:
            raise RequestError(f"this model does not support the {params.task!r} task (it "
                               f"supports {', '.join(self.pooling_info.tasks)})", "task")
        prompt = req.prompt_token_ids
        check_prompt_ids(prompt, self.info.vocab_size, "input", noun="input")
        if len(prompt) > self.max_model_len:
            raise RequestError(f"This model's maximum context length is {self.max_model_len} "
                               f"tokens, but the input has {len(prompt)} tokens", "input")
        types = req.token_type_ids
        if types is not None and len(types) != len(prompt):
            raise RequestError("token_type_ids must be as long as the prompt", "token_type_ids")
        if params.dimensions is not None:
            self._check_dimensions(params.dimensions)
        return params

    def _check_dimensions(self, dims: int) -> None:
        info = self.pooling_info
        if not info.is_matryoshka:
            raise RequestError("this model does not support Matryoshka representation: changing "
                               "the output dimensions would give poor results", "dimensions")
        if info.matryoshka_dimensions and dims not in info.matryoshka_dimensions:
            raise RequestError(f"dimensions must be one of {info.matryoshka_dimensions}, "
                               f"got {dims}", "dimensions")
        if not 1 <= dims <= info.hidden_size:
            raise RequestError(f"dimensions must be between 1 and {info.hidden_size}, got {dims}",
                               "dimensions")

    def add_request(self, req: EngineCoreRequest) -> PoolingRequest:
        params = self.validate_request(req)
        self.ensure_new_request_id(req.request_id)
        self.check_admit_faults(req.request_id)
        request = PoolingRequest(req.request_id, list(req.prompt_token_ids), req.token_type_ids,
                                 params, req.priority,
                                 req.arrival_time or time.monotonic())
        self.scheduler.add_request(request)
        return request

    # ---- the busy loop's body ------------------------------------------------------------------
    def _step(self) -> list[EngineCoreOutput]:
        """Pool one batch of waiting requests; each finishes in this step (under
        SchedulingCoreMixin.step's fault isolation)."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self._step_requests = batch
        self.check_step_faults(r.request_id for r in batch)
        ready: list[PoolingRequest] = []
        for r in batch:
            try:
                if fault_injection.INJECTOR is not None:
                    fault_injection.INJECTOR.check("prepare", r.request_id)
                ready.append(r)
            except Exception as exc:  # noqa: BLE001 - that request's failure, not the step's
                self.scheduler.fail_request(r, "prepare", exc)
        if not ready:
            return []
        self.scheduler.num_running = len(ready)
        try:
            pooled = self.runner.execute(ready)
        finally:
            self.scheduler.num_running = 0
        self.num_steps += 1
        self.num_pooled += len(ready)
        outputs: list[EngineCoreOutput] = []
        for r, out in zip(ready, pooled):
            self.guarded_output(outputs, r, self._pooled_output, out)
        return outputs

    @staticmethod
    def _pooled_output(request: PoolingRequest, pooled: PoolingOutput) -> EngineCoreOutput:
        return EngineCoreOutput(request.request_id, [], finish_reason="stop",
                                num_prompt_tokens=request.num_prompt_tokens, pooled=pooled)
