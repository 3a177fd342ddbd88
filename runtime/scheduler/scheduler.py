"""Scheduler: one token budget per step over running then waiting requests (engine-core process)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from fornax.runtime.config import CacheConfig, SchedulerConfig
from fornax.runtime.engine import fault_injection
from fornax.runtime.engine.request_failure import RequestFailure
from fornax.runtime.kv_cache.kv_cache_manager import KVCacheManager
from fornax.runtime.scheduler.prefill_budget import PrefillBudget
from fornax.runtime.scheduler.request import Request, RequestStatus
from fornax.runtime.scheduler.waiting_queue import WaitingQueue

logger = logging.getLogger(__name__)


@dataclass
class NewRequestData:
    """A request the model runner has not seen (or forgot on preemption): full state."""

    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    request: Request


@dataclass
class CachedRequestData:
    """A request the runner already tracks: only what changed."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """What to run this step, as a diff against the runner's persistent state."""

    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    finished_req_ids: set[str] = field(default_factory=set)
    # the step's shape for the step-cost model (runtime/scheduler/prefill_budget.py): requests
    # decoding one token, and the tokens of the others (prompt chunks, recomputation)
    num_decode_reqs: int = 0
    num_prefill_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


class Scheduler:
    """Continuous batching: decodes and (chunked) prefills share one token budget per step."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 kv_cache_manager: KVCacheManager, max_model_len: int) -> None:
        self.config = scheduler_config
        self.block_size = cache_config.block_size
        self.kv = kv_cache_manager
        self.max_model_len = max_model_len
        self.priority_policy = scheduler_config.policy == "priority"
        self.requests: dict[str, Request] = {}
        self.waiting = WaitingQueue(self.priority_policy)  # O(1) removal (lazy deletion)
        self.running: list[Request] = []
        self._finished_req_ids: set[str] = set()
        self._runner_known: set[str] = set()
        self._num_sent_blocks: dict[str, int] = {}
        self.num_preemptions = 0
        self.failures: list[RequestFailure] = []  # taken by the engine core after each step
        # while requests decode, a step's prompt tokens are capped (fed by the engine's timing)
        self.prefill_budget = PrefillBudget(scheduler_config.prefill_itl_factor)

    # ---- admission and removal -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self._enqueue_waiting(request)

    def _enqueue_waiting(self, request: Request, front: bool = False) -> None:
        if front:
            self.waiting.push_front(request)
        else:
            self.waiting.push(request)

    def abort_requests(self, request_ids: list[str]) -> list[Request]:
        """Finish the given requests as aborted; unknown or already-finished ids are ignored."""
        aborted = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None or request.is_finished:
                continue
            self.finish_request(request, RequestStatus.FINISHED_ABORTED)
            aborted.append(request)
        return aborted

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        if not self.waiting.remove(request) and request in self.running:  # both O(1)-ish
            self.running.remove(request)  # at most max_num_seqs long
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
        self._forget(request.request_id)

    def fail_request(self, request: Request, stage: str, error: BaseException,
                     batch: bool = False) -> None:
        """End a request that failed while being served: its blocks are freed, the runner
        forgets it, and `failures` keeps the record for the engine core to report."""
        if not batch:
            logger.error("request %s failed at stage %s", request.request_id, stage,
                         exc_info=error)
        if self.requests.get(request.request_id) is request:
            self.finish_request(request, RequestStatus.FINISHED_ERROR)
        request.status = RequestStatus.FINISHED_ERROR
        self.failures.append(RequestFailure(request.request_id, stage, error, batch,
                                            request.num_prompt_tokens))

    def _forget(self, req_id: str) -> None:
        self._num_sent_blocks.pop(req_id, None)
        if req_id in self._runner_known:
            self._runner_known.discard(req_id)
            self._finished_req_ids.add(req_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_waiting_prompt_tokens(self) -> int:
        """Prompt tokens of the waiting requests (--max-num-queued-tokens counts these)."""
        return self.waiting.num_prompt_tokens

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # prompt tokens this step may take: the adaptive cap while requests decode (chunked
        # prefill only: an unsplittable prompt would otherwise wait for the decodes to end)
        prefill_left = budget
        if self.config.enable_chunked_prefill:
            cap = self.prefill_budget.cap(sum(map(_is_decoding, self.running)))
            prefill_left = budget if cap is None else cap
        prefill_taken: dict[str, int] = {}
        scheduled: list[Request] = []
        preempted_now: set[str] = set()

        # 1. Running requests first, in order; preempt from the back when blocks run out.
        # A request whose scheduling raises fails alone (it leaves self.running; i stays).
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            decoding = _is_decoding(request)
            limit = budget if decoding else self._prefill_limit(budget, prefill_left)
            if limit <= 0:  # a prompt chunk, and this step's prompt tokens are taken
                i += 1
                continue
            victims: list[tuple[Request, int]] = []  # (preempted request, its index in running)
            try:
                num_new = self._schedule_running(request, limit, preempted_now, victims)
            except Exception as exc:  # noqa: BLE001 - that request's failure, not the engine's
                num_new = None
                failure = exc
            for victim, index in victims:
                if victim is request:
                    continue
                # a victim scheduled earlier in this step (the priority policy may pick one)
                # leaves the step: its tokens go back to the budget, and the requests after it
                # moved up one place in self.running
                taken = out.num_scheduled_tokens.pop(victim.request_id, None)
                if taken is not None:
                    budget += taken
                    prefill_left += prefill_taken.pop(victim.request_id, 0)
                    scheduled.remove(victim)
                if index < i:
                    i -= 1
            if num_new is None:
                self.fail_request(request, "schedule", failure)
                continue
            if request.request_id in preempted_now:
                continue  # it was removed from self.running; index i now names the next one
            if num_new > 0:
                scheduled.append(request)
                out.num_scheduled_tokens[request.request_id] = num_new
                budget -= num_new
                if not decoding:  # a prompt chunk (or the recomputation of a preempted one)
                    prefill_taken[request.request_id] = num_new
                    prefill_left -= num_new
            i += 1

        # 2. Then waiting requests, while budget, prompt tokens, sequence slots and blocks allow;
        # at most max_num_partial_prefills prompts stay unfinished after the step.
        num_partial = sum(1 for r in self.running if r.num_computed_tokens
                          + out.num_scheduled_tokens.get(r.request_id, 0) < r.num_tokens
                          ) if self.waiting else 0
        while (self.waiting and budget > 0 and prefill_left > 0 and not preempted_now
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            partial_ok = num_partial < self.config.max_num_partial_prefills
            try:
                num_new = self._admit_waiting(request, self._prefill_limit(budget, prefill_left),
                                              partial_ok)
            except Exception as exc:  # noqa: BLE001 - that request's failure, not the engine's
                self.fail_request(request, "schedule", exc)
                continue
            if num_new is None:
                break
            scheduled.append(request)
            out.num_scheduled_tokens[request.request_id] = num_new
            budget -= num_new
            prefill_left -= num_new
            if request.num_computed_tokens + num_new < request.num_tokens:
                num_partial += 1

        for request in scheduled:
            try:
                self._describe(request, out)
            except Exception as exc:  # noqa: BLE001 - that request's failure, not the engine's
                out.num_scheduled_tokens.pop(request.request_id, None)
                self.fail_request(request, "schedule", exc)
        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        out.num_decode_reqs = sum(1 for r in scheduled if _is_decoding(r)
                                  and r.request_id in out.num_scheduled_tokens)
        out.num_prefill_tokens = out.total_num_scheduled_tokens - out.num_decode_reqs
        out.finished_req_ids = self._finished_req_ids
        self._finished_req_ids = set()
        return out

    def _schedule_running(self, request: Request, budget: int, preempted_now: set[str],
                          victims: list[tuple[Request, int]]) -> int:
        """Blocks for a running request's next tokens, preempting from the back when they run
        out (each victim and its former index go into `victims`); returns how many tokens it
        runs (0: none to run)."""
        if fault_injection.INJECTOR is not None:
            fault_injection.INJECTOR.check("schedule", request.request_id)
        num_new = min(request.num_tokens - request.num_computed_tokens, budget)
        if num_new <= 0:
            return 0
        while not self.kv.allocate_slots(request, num_new):
            victim = self._pick_victim()
            victims.append((victim, self._preempt(victim)))
            preempted_now.add(victim.request_id)
            if victim is request:
                break
        return num_new

    def _prefill_limit(self, budget: int, prefill_left: int) -> int:
        """Most tokens one prompt may run this step: the step's budget and prompt tokens left,
        and --long-prefill-token-threshold (with chunked prefill)."""
        limit = min(budget, prefill_left)
        threshold = self.config.long_prefill_token_threshold
        if threshold > 0 and self.config.enable_chunked_prefill:
            limit = min(limit, threshold)
        return limit

    def _admit_waiting(self, request: Request, budget: int, partial_ok: bool = True) -> int | None:
        """Move the head of the waiting queue to running with blocks for its next tokens;
        returns how many it runs, or None when it does not fit (it stays at the head). With
        `partial_ok` False only a prompt that finishes in this step fits."""
        if fault_injection.INJECTOR is not None:
            fault_injection.INJECTOR.check("schedule", request.request_id)
        hits, num_hit_tokens = self.kv.get_computed_blocks(request)
        if request.sampling_params.prompt_logprobs is not None and num_hit_tokens:
            hits, num_hit_tokens = [], 0  # every prompt position's logits are needed
        num_new = request.num_tokens - num_hit_tokens
        if num_new > budget and not (self.config.enable_chunked_prefill and partial_ok):
            return None
        num_new = min(num_new, budget)
        request.num_computed_tokens = num_hit_tokens
        if not self.kv.allocate_slots(request, num_new, hits):
            request.num_computed_tokens = 0
            return None
        self.waiting.pop(0)
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return num_new

    def _pick_victim(self) -> Request:
        if self.priority_policy:
            return max(self.running, key=lambda r: r.sort_key())
        return self.running[-1]

    def _preempt(self, request: Request) -> int:
        """Back to the waiting queue with its blocks freed; returns its former running index."""
        index = self.running.index(request)
        del self.running[index]
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._forget(request.request_id)
        self._enqueue_waiting(request, front=True)
        logger.debug("preempted %s (recompute later)", request.request_id)
        return index

    def _describe(self, request: Request, out: SchedulerOutput) -> None:
        block_ids = self.kv.block_ids(request.request_id)
        rid = request.request_id
        if rid not in self._runner_known:
            self._runner_known.add(rid)
            out.scheduled_new_reqs.append(NewRequestData(
                req_id=rid, token_ids=list(request.all_token_ids),
                num_prompt_tokens=request.num_prompt_tokens, block_ids=block_ids,
                num_computed_tokens=request.num_computed_tokens, request=request))
        else:
            sent = self._num_sent_blocks.get(rid, 0)
            out.scheduled_cached_reqs.append(CachedRequestData(
                req_id=rid, new_block_ids=block_ids[sent:],
                num_computed_tokens=request.num_computed_tokens))
        self._num_sent_blocks[rid] = len(block_ids)

    # ---- after the forward -----------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput,
                           sampled: dict[str, int]) -> list[tuple[Request, list[int]]]:
        """Advance computed counts, append sampled tokens, finish requests that hit a stop.

        `sampled` maps request id to the token sampled at its last scheduled position. Returns
        (request, new token ids) for every request that produced a token or finished.
        """
        results: list[tuple[Request, list[int]]] = []
        for rid, num in out.num_scheduled_tokens.items():
            request = self.requests.get(rid)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted, preempted or failed in the meantime
            stage = "sample"
            try:  # whatever raises here fails this request alone
                request.num_computed_tokens += num
                if request.num_computed_tokens < request.num_tokens:
                    continue  # a partial prefill chunk: its sample is discarded
                token = sampled[rid]
                request.append_output_token(token)
                stage = "grammar"
                status = self._advance_grammar(request, token)
                stage = "stop_check"
                status = status or self._check_stop(request, token)
                if status is not None:
                    self.finish_request(request, status)
            except Exception as exc:  # noqa: BLE001 - that request's failure, not the engine's
                self.fail_request(request, stage, exc)
                continue
            results.append((request, [token]))
        return results

    @staticmethod
    def _advance_grammar(request: Request, token: int) -> RequestStatus | None:
        """Feed the sampled token to the request's grammar; a finished grammar ends it."""
        grammar = request.grammar
        if grammar is None or grammar.is_terminated():
            return None
        if fault_injection.INJECTOR is not None:
            fault_injection.INJECTOR.check("grammar", request.request_id)
        if not request.grammar_active:
            marker = request.sampling_params.structured_outputs_after or []
            out = request.output_token_ids
            request.grammar_active = len(out) >= len(marker) and out[-len(marker):] == marker
            return None  # the marker itself is not part of the constrained output
        if not grammar.accept_token(token):
            logger.error("request %s: token %d rejected by its grammar", request.request_id, token)
            request.stop_reason = "grammar_violation"
            return RequestStatus.FINISHED_ABORTED
        return RequestStatus.FINISHED_STOPPED if grammar.is_terminated() else None

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        if fault_injection.INJECTOR is not None:
            fault_injection.INJECTOR.check("stop_check", request.request_id)
        params = request.sampling_params
        num_out = request.num_output_tokens
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if num_out >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        rd = params.repetition_detection
        if rd is not None and num_out >= params.min_tokens and has_repeating_tail(
                request.output_token_ids, rd.min_pattern_size, rd.max_pattern_size, rd.min_count):
            request.stop_reason = REPETITION_STOP_REASON
            return RequestStatus.FINISHED_STOPPED
        return None


REPETITION_STOP_REASON = "repetition_detected"


def has_repeating_tail(tokens: list[int], min_size: int, max_size: int, min_count: int) -> bool:
    """True when the last `size * min_count` tokens are one pattern of some size repeated."""
    for size in range(min_size, max_size + 1):
        span = size * min_count
        if span > len(tokens):
            return False
        if tokens[-1] != tokens[-1 - size]:  # O(1) for most sizes: no period of this size
            continue
        tail = tokens[-span:]
        if tail[size:] == tail[:-size]:  # periodic with period `size`: one C-level compare
            return True
    return False


def _is_decoding(request: Request) -> bool:
    """A request past its prompt with one token to run: a stream waiting for its next token."""
    return request.num_output_tokens > 0 and request.num_tokens - request.num_computed_tokens == 1
