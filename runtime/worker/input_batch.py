"""InputBatch: the model runner's persistent host-side state of running requests (engine core)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fornax.runtime.engine import fault_injection
from fornax.runtime.engine.messages import TokenLogprobs
from fornax.runtime.errors import RequestError
from fornax.runtime.sampling.params import SamplingParams

_INT32_MAX = 2**31 - 1
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def check_row_params(params: SamplingParams, vocab_size: int) -> None:
    """A request's sampling settings as its row and the sampler will index with them: token ids
    that become tensor indices lie in the vocabulary, the seed fits a generator. The API worker
    validates these first; this keeps a request that slipped through from failing a whole step
    (or, on a GPU, the device) - it fails alone, with a RequestError naming the field."""

    def in_vocab(ids: Any, field: str) -> None:
        if not ids or (0 <= min(ids) and max(ids) < vocab_size):  # C-speed for the usual case
            return
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise RequestError(f"token id {bad} in {field} is out of vocabulary (size "
                           f"{vocab_size})", field)

    if params.min_tokens > 0:  # stop ids are banned until min_tokens (as indices)
        in_vocab(params.stop_token_ids, "stop_token_ids")
    if params.logit_bias:
        in_vocab(params.logit_bias, "logit_bias")
    if params.allowed_token_ids is not None:
        in_vocab(params.allowed_token_ids, "allowed_token_ids")
    for word in params.bad_words_token_ids or ():
        in_vocab(word[-1:], "bad_words")
    seed = params.seed
    if seed is not None and not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise RequestError(f"seed {seed} is out of range", "seed")


class InputBatch:
    """One row per live request: token ids, computed count, block table and sampling settings.

    Rows are kept dense: removing a request moves the last row into its place.
    """

    def __init__(self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int,
                 vocab_size: int = 0) -> None:
        self.max_num_reqs = max_num_reqs
        self.vocab_size = vocab_size  # > 0: `add` checks a request's token-id settings against it
        self.max_model_len = max_model_len
        self.req_ids: list[str] = []
        self.index: dict[str, int] = {}
        self.token_ids_np = np.zeros((max_num_reqs, max_model_len), dtype=np.int32)
        self.num_tokens_np = np.zeros(max_num_reqs, dtype=np.int32)
        self.num_prompt_np = np.zeros(max_num_reqs, dtype=np.int32)
        self.needs_logits_inputs_np = np.zeros(max_num_reqs, dtype=bool)
        self.num_computed_np = np.zeros(max_num_reqs, dtype=np.int32)
        self.block_table_np = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks_np = np.zeros(max_num_reqs, dtype=np.int32)
        self.temperature_np = np.zeros(max_num_reqs, dtype=np.float32)
        self.top_p_np = np.ones(max_num_reqs, dtype=np.float32)
        self.top_k_np = np.zeros(max_num_reqs, dtype=np.int32)
        self.min_p_np = np.zeros(max_num_reqs, dtype=np.float32)
        self.num_logprobs_np = np.full(max_num_reqs, -1, dtype=np.int32)
        self.num_prompt_logprobs_np = np.full(max_num_reqs, -1, dtype=np.int32)
        self.params: list[SamplingParams] = []
        self.generators: dict[str, torch.Generator] = {}
        self.grammars: dict[str, Any] = {}  # request id -> xgrammar matcher
        self.requests: dict[str, Any] = {}  # request id -> scheduler Request (grammar state)
        # bumped whenever rows join, leave or move: what was derived from the rows' sampling
        # settings (the sampling metadata) stays valid while it is unchanged
        self.version = 0

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)

    def add(self, req_id: str, token_ids: list[int], num_prompt: int, num_computed: int,
            block_ids: list[int], params: SamplingParams, device: torch.device,
            grammar: Any = None, request: Any = None) -> None:
        if req_id in self.index:
            raise RuntimeError(f"request {req_id} is already in the batch")
        row = len(self.req_ids)
        if row >= self.max_num_reqs:
            raise RuntimeError("input batch is full")
        if self.vocab_size > 0:
            check_row_params(params, self.vocab_size)  # before any state changes
        self.version += 1
        self.req_ids.append(req_id)
        self.params.append(params)
        self.index[req_id] = row
        n = len(token_ids)
        self.token_ids_np[row, :n] = token_ids
        self.num_tokens_np[row] = n
        self.num_prompt_np[row] = num_prompt
        self.needs_logits_inputs_np[row] = bool(
            params.uses_penalties or params.logit_bias or params.allowed_token_ids is not None
            or params.min_tokens > 0 or params.bad_words_token_ids
            or params.thinking_token_budget is not None)
        self.num_computed_np[row] = num_computed
        self.num_blocks_np[row] = 0
        self.append_blocks(row, block_ids)
        self.temperature_np[row] = params.temperature
        self.top_p_np[row] = params.top_p
        self.top_k_np[row] = min(params.top_k, _INT32_MAX) if params.top_k > 0 else 0
        self.min_p_np[row] = params.min_p
        self.num_logprobs_np[row] = -1 if params.logprobs is None else params.logprobs
        self.num_prompt_logprobs_np[row] = (-1 if params.prompt_logprobs is None
                                            else params.prompt_logprobs)
        if grammar is not None:
            self.grammars[req_id] = grammar
            self.requests[req_id] = request
        if params.seed is not None and not params.greedy:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed)
            self.generators[req_id] = gen

    def append_blocks(self, row: int, block_ids: list[int]) -> None:
        start = int(self.num_blocks_np[row])
        self.block_table_np[row, start:start + len(block_ids)] = block_ids
        self.num_blocks_np[row] = start + len(block_ids)

    def remove(self, req_id: str) -> None:
        row = self.index.pop(req_id, None)
        if row is None:
            return
        self.version += 1
        self.generators.pop(req_id, None)
        self.grammars.pop(req_id, None)
        self.requests.pop(req_id, None)
        last = len(self.req_ids) - 1
        if row != last:
            moved = self.req_ids[last]
            self.req_ids[row] = moved
            self.params[row] = self.params[last]
            self.index[moved] = row
            n = int(self.num_tokens_np[last])
            self.token_ids_np[row, :n] = self.token_ids_np[last, :n]
            for arr in (self.num_tokens_np, self.num_prompt_np, self.needs_logits_inputs_np,
                        self.num_computed_np, self.num_blocks_np,
                        self.temperature_np, self.top_p_np, self.top_k_np, self.min_p_np,
                        self.num_logprobs_np, self.num_prompt_logprobs_np):
                arr[row] = arr[last]
            nb = int(self.num_blocks_np[last])
            self.block_table_np[row, :nb] = self.block_table_np[last, :nb]
        self.req_ids.pop()
        self.params.pop()

    def grammar_active(self, req_id: str) -> bool:
        request = self.requests.get(req_id)
        return request is None or request.grammar_active

    def prompt_ids(self, row: int) -> np.ndarray:
        return self.token_ids_np[row, : self.num_prompt_np[row]]

    def output_ids(self, row: int) -> np.ndarray:
        return self.token_ids_np[row, self.num_prompt_np[row] : self.num_tokens_np[row]]

    def append_token(self, row: int, token_id: int) -> None:
        n = int(self.num_tokens_np[row])
        self.token_ids_np[row, n] = token_id
        self.num_tokens_np[row] = n + 1

    def record_samples(self, done: list[tuple[str, int]], result: Any,
                       failed: dict[str, tuple[str, BaseException]]
                       ) -> tuple[dict[str, int], dict[str, TokenLogprobs]]:
        """Append each sampled token to its row (`done[j]` = (request id, row) of sample j) and
        cut its logprobs to the request's k. One row's failure fails its request alone: it goes
        into `failed` (stage "sample"); a request already in `failed` has its sample dropped."""
        tokens = result.sampled.tolist()  # the one device->host sync of the step
        lp = None
        if result.logprobs is not None:
            lp = (result.logprob_token_ids.tolist(), result.logprobs.tolist(),
                  result.sampled_ranks.tolist())
        sampled: dict[str, int] = {}
        logprobs: dict[str, TokenLogprobs] = {}
        for j, (rid, row) in enumerate(done):
            if rid in failed:  # e.g. its grammar failed: its sample is discarded
                continue
            try:
                if fault_injection.INJECTOR is not None:
                    fault_injection.INJECTOR.check("sample", rid)
                k = int(self.num_logprobs_np[row])
                if lp is not None and k >= 0:
                    logprobs[rid] = TokenLogprobs(lp[0][j][: k + 1], lp[1][j][: k + 1], lp[2][j])
                self.append_token(row, tokens[j])
                sampled[rid] = tokens[j]
            except Exception as exc:  # noqa: BLE001 - the engine core fails the request
                logprobs.pop(rid, None)
                failed[rid] = ("sample", exc)
        return sampled, logprobs
