"""What the three engine cores share: prompt checks, KV sizing, runtime info, abort, stats, and
the fault isolation of `step()` (a failure fails one request, or one step, never the engine)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from fornax.runtime.engine import fault_injection
from fornax.runtime.engine.contract import EngineLoad, EngineRuntimeInfo, RunnerType, SleepMode
from fornax.runtime.engine.messages import EngineCoreOutput, RequestTimings
from fornax.runtime.engine.request_failure import RequestFailure, failure_output, is_device_error
from fornax.runtime.engine.stats import StepTokenHistogram
from fornax.runtime.errors import ConfigError, FornaxError, RequestError
from fornax.runtime.kv_cache.kv_cache_manager import cdiv
from fornax.runtime.loaders.model_files import ModelFiles
from fornax.runtime.scheduler.request import Request

if TYPE_CHECKING:
    from fornax.runtime.engine.messages import PoolingModelInfo
    from fornax.runtime.structured_output.grammar import StructuredOutputManager

logger = logging.getLogger(__name__)

# Steps in a row whose failure cannot be pinned on one request before the engine gives up (the
# engine-core process then dies with EngineDead, and an orchestrator restarts it).
MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineStepError(FornaxError):
    """The engine cannot go on: a device error, or MAX_CONSECUTIVE_STEP_FAILURES failed steps."""


def eos_token_ids(files: ModelFiles) -> frozenset[int]:
    """The end-of-sequence ids named by generation_config.json and config.json."""
    ids: set[int] = set()
    for source in (files.generation_config, files.hf_config):
        value = source.get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def runtime_info(runner: Any, files: ModelFiles, num_blocks: int, block_size: int,
                 max_model_len: int, device: str) -> EngineRuntimeInfo:
    """The runtime info of a core whose runner has a paged KV cache."""
    return EngineRuntimeInfo(
        num_kv_blocks=num_blocks, block_size=block_size, max_model_len=max_model_len,
        vocab_size=runner.vocab_size, eos_token_ids=eos_token_ids(files),
        architecture=runner.arch, dtype=str(runner.dtype).removeprefix("torch."), device=device)


def allocate_kv_cache(runner: Any, block_size: int, max_model_len: int, advice: str) -> int:
    """Size the runner's paged KV cache, refuse one that cannot hold a whole sequence, allocate it.

    Returns the number of blocks (block 0 is the null block, so one less is usable)."""
    num_blocks = runner.determine_num_blocks()
    if (num_blocks - 1) < cdiv(max_model_len, block_size):
        raise ConfigError(
            f"the KV cache holds {(num_blocks - 1) * block_size} tokens, less than one "
            f"sequence of max_model_len {max_model_len}; {advice}")
    runner.initialize_kv_cache(num_blocks)
    return num_blocks


class SchedulingCoreMixin:
    """Admission bookkeeping shared by the cores: `self.scheduler` holds the live requests.

    `step()` runs the core's `_step()` under fault isolation. A per-request stage (admit,
    schedule, prepare, grammar, sample, stop check, output) that raises fails that request alone
    through `scheduler.fail_request`: its KV blocks are freed, the runner drops its row, and it
    ends with an error output (finish_reason "error"). An exception that escapes `_step()` fails
    the requests of that step (`_step_requests`) and the engine goes on; a device error, or
    MAX_CONSECUTIVE_STEP_FAILURES failed steps in a row, raises EngineStepError.
    """

    scheduler: Any
    runner: Any
    kv: Any = None  # the paged KV-cache manager (None: the core has no KV cache)
    # the contract's capabilities (runtime/engine/contract.py): a core offering one sets it
    runner_type: RunnerType = "generate"
    structured: StructuredOutputManager | None = None
    pooling_info: PoolingModelInfo | None = None
    sleep_mode: SleepMode | None = None
    reports_prefix_cache = True  # False where the cache never shares blocks (encoder-decoder)
    _step_requests: list[Any] | None = None  # what the running step serves, once scheduled
    _step_forgotten: set[str] | None = None  # ids the runner was to drop in the running step
    _consecutive_step_failures = 0
    num_steps = 0
    _sleep: Any = None  # a core with sleep mode keeps its SleepState here (its level: metrics)
    _step_tokens: StepTokenHistogram | None = None  # tokens per step (vllm:iteration_tokens_total)

    def _step(self) -> list[EngineCoreOutput]:
        """A paged-KV core's step: schedule, run the model, one output per request served."""
        ran = self._execute_scheduled()
        if ran is None:
            return []
        return self._outputs(*ran)

    def _outputs(self, sched_out: Any, runner_out: Any) -> list[EngineCoreOutput]:
        """Update the requests with the step's samples; build each one's output (guarded)."""
        outputs: list[EngineCoreOutput] = []
        for request, new_tokens in self.scheduler.update_from_output(sched_out,
                                                                     runner_out.sampled):
            self.guarded_output(outputs, request, self._make_output, new_tokens, runner_out)
        return outputs

    def _make_output(self, request: Any, new_tokens: list[int],
                     runner_out: Any) -> EngineCoreOutput:
        """One request's output of a step: its new tokens and their logprobs, how it ended."""
        lp = runner_out.logprobs.get(request.request_id)
        if new_tokens and not request.first_token_time:
            request.first_token_time = time.monotonic()
        finish_reason = request.status.finish_reason
        return EngineCoreOutput(
            request_id=request.request_id, new_token_ids=new_tokens,
            finish_reason=finish_reason, stop_reason=request.stop_reason,
            new_logprobs=[lp] if lp else None, num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            timings=request_timings(request) if finish_reason is not None else None)

    def step(self) -> list[EngineCoreOutput]:
        """Run one scheduling step; returns what every touched request produced (failed ones
        end with an error output)."""
        self._step_requests = self._step_forgotten = None
        try:
            outputs = self._step()
        except Exception as exc:  # noqa: BLE001 - sorted out by _fail_step (or re-raised there)
            self._fail_step(exc)
            outputs = []
        else:
            self._consecutive_step_failures = 0
        failures = self.scheduler.failures
        if not failures:
            return outputs
        self.scheduler.failures = []
        return self._with_failures(outputs, failures)

    def _execute_scheduled(self) -> tuple[Any, Any] | None:
        """Schedule, then run the model on it (a paged-KV core's step up to its outputs): the
        step's requests are recorded first, so a failure of the whole step fails exactly them.
        None when nothing was scheduled."""
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty:
            if sched_out.finished_req_ids:
                self.runner.execute_model(sched_out)  # let the runner drop finished rows
            return None
        requests = self.scheduler.requests
        self._step_requests = [requests[rid] for rid in sched_out.num_scheduled_tokens]
        self._step_forgotten = sched_out.finished_req_ids
        now = time.monotonic()
        for request in self._step_requests:
            if not request.scheduled_time:
                request.scheduled_time = now
        if self._step_tokens is None:
            self._step_tokens = StepTokenHistogram()
        self._step_tokens.observe(sched_out.total_num_scheduled_tokens)
        self.check_step_faults(sched_out.num_scheduled_tokens)
        runner_out = self.runner.execute_model(sched_out)
        self.num_steps += 1
        if runner_out.failed:
            self.fail_runner_requests(runner_out.failed)
        return sched_out, runner_out

    def _fail_step(self, exc: Exception) -> None:
        """A step failed as a whole: fail the requests it served, unless the engine must end."""
        if is_device_error(exc):
            raise EngineStepError(f"device error: {type(exc).__name__}: {exc}") from exc
        self._consecutive_step_failures += 1
        count = self._consecutive_step_failures
        logger.error("engine step failed (%d in a row, %d ends the engine)", count,
                     MAX_CONSECUTIVE_STEP_FAILURES, exc_info=exc)
        if count >= MAX_CONSECUTIVE_STEP_FAILURES:
            raise EngineStepError(f"{count} engine steps in a row failed; the last: "
                                  f"{type(exc).__name__}: {exc}") from exc
        victims = self._step_requests
        if victims is None:  # failed while scheduling: whatever holds blocks may be half-done
            victims = list(self.scheduler.running) if self.kv is not None else []
        for request in victims:
            self.scheduler.fail_request(request, "step", exc, batch=True)
        if self._step_forgotten:
            self._drop_rows(self._step_forgotten)

    def _with_failures(self, outputs: list[EngineCoreOutput],
                       failures: list[RequestFailure]) -> list[EngineCoreOutput]:
        """Replace the outputs of failed requests by one error output each."""
        errors: dict[str, EngineCoreOutput] = {}
        for failure in failures:
            if failure.request_id not in errors:
                errors[failure.request_id] = failure_output(failure)
        self._drop_rows(errors)
        return [o for o in outputs if o.request_id not in errors] + list(errors.values())

    def _drop_rows(self, request_ids: Iterable[str]) -> None:
        """The runner forgets these requests now (the scheduler also tells it next step)."""
        if self.kv is not None:  # a paged-KV runner keeps rows; the pooling runner keeps none
            self.runner.remove_requests(list(request_ids))

    def fail_runner_requests(self, failed: dict[str, tuple[str, BaseException]]) -> None:
        """Requests the runner could not serve this step (it already dropped their rows)."""
        for rid, (stage, exc) in failed.items():
            request = self.scheduler.requests.get(rid)
            if request is not None:
                self.scheduler.fail_request(request, stage, exc)

    def guarded_output(self, outputs: list[EngineCoreOutput], request: Any,
                       build: Callable[..., EngineCoreOutput], *args: Any) -> None:
        """Append `build(request, *args)`; if it raises, the request fails alone ("output")."""
        try:
            if fault_injection.INJECTOR is not None:
                fault_injection.INJECTOR.check("output", request.request_id)
            outputs.append(build(request, *args))
        except Exception as exc:  # noqa: BLE001 - that request's failure, not the engine's
            if is_device_error(exc):
                raise
            self.scheduler.fail_request(request, "output", exc)

    @staticmethod
    def check_step_faults(request_ids: Any) -> None:
        """Test-only fault injection of the whole-step stage (see fault_injection)."""
        if fault_injection.INJECTOR is not None:
            fault_injection.INJECTOR.check_batch(list(request_ids))

    @staticmethod
    def check_admit_faults(request_id: str) -> None:
        """Test-only fault injection while admitting (see fault_injection)."""
        if fault_injection.INJECTOR is not None:
            fault_injection.INJECTOR.check("admit", request_id)

    def ensure_new_request_id(self, request_id: str) -> None:
        if request_id in self.scheduler.requests:
            raise RequestError(f"request id {request_id!r} is already running", "request_id")

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        return [EngineCoreOutput(r.request_id, [], finish_reason="abort",
                                 num_prompt_tokens=r.num_prompt_tokens,
                                 num_cached_tokens=max(r.num_cached_tokens, 0),
                                 timings=request_timings(r))
                for r in self.scheduler.abort_requests(request_ids)]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> EngineLoad:
        """Numbers for metrics and /load; cores without a KV cache or preemption report 0."""
        kv = self.kv
        kv_stats = kv.stats if kv is not None and self.reports_prefix_cache else None
        steps = self._step_tokens
        return EngineLoad(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=kv.usage() if kv is not None else 0.0,
            prefix_cache_queries=kv_stats.queries if kv_stats is not None else 0,
            prefix_cache_hits=kv_stats.hits if kv_stats is not None else 0,
            num_preemptions=self.scheduler.num_preemptions,
            iteration_tokens_counts=list(steps.counts) if steps is not None else [],
            iteration_tokens_sum=steps.total if steps is not None else 0,
            sleep_level=self._sleep.level if self._sleep is not None else 0)


def request_timings(request: Any) -> RequestTimings | None:
    """A finishing request's phases from its engine timestamps (vLLM's definitions); a request
    never scheduled spent all its time queued. None for a pooling request (no phases)."""
    if not isinstance(request, Request):
        return None
    now = time.monotonic()
    scheduled, first = request.scheduled_time, request.first_token_time
    if not scheduled:
        return RequestTimings(queued_s=max(0.0, now - request.queued_time))
    return RequestTimings(
        queued_s=max(0.0, scheduled - request.queued_time),
        prefill_s=max(0.0, (first or now) - scheduled),
        decode_s=max(0.0, now - first) if first else 0.0,
        inference_s=max(0.0, now - scheduled))
