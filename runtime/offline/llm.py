"""Offline `LLM` API: the engine core in-process, vLLM's `generate` / `chat` shape (one process)."""

from __future__ import annotations

import gc
import itertools
import logging
from collections.abc import Sequence
from typing import Any

from fornax.runtime.config import make_engine_config
from fornax.runtime.engine.factory import make_engine_core
from fornax.runtime.engine.messages import EngineCoreRequest
from fornax.runtime.errors import RequestError, RequestFailedError
from fornax.runtime.offline.outputs import CompletionOutput, RequestOutput
from fornax.runtime.offline.pooling_llm import PoolingMixin
from fornax.runtime.sampling.beam_search import BeamSearchParams, BeamSearchState
from fornax.runtime.sampling.params import SamplingParams
from fornax.runtime.sampling.request_prep import (
    check_prompt,
    child_requests,
    generation_defaults,
    prepare_sampling_params,
    resolve_max_tokens,
    truncate_prompt,
)
from fornax.runtime.text.output_processor import OutputProcessor
from fornax.runtime.text.tokenizer import TokenizerFront

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict[str, Any]


class LLM(PoolingMixin):
    """Generate text from prompts with continuous batching, without a server; with a pooling model,
    embed / classify / score (see PoolingMixin).

    `LLM()` with no model loads the packaged default (SmolLM2-135M-Instruct).
    """

    def __init__(self, model: str | None = None, *, chat_template: str | None = None,
                 tokenizer: str | None = None, **engine_args: Any) -> None:
        if tokenizer is not None:  # a folder or a hub id in the local cache, as --tokenizer
            engine_args["tokenizer"] = tokenizer
        self.config = make_engine_config(model or "", **engine_args).resolve()
        self.engine = make_engine_core(self.config)  # generation or pooling (contract.EngineCore)
        self.tokenizer = TokenizerFront(self.engine.files.tokenizer_path, chat_template)
        self.processor = OutputProcessor(self.tokenizer)
        self._counter = itertools.count()

    def close(self) -> None:
        """Free the engine now (weights, KV cache, CUDA graphs, grammar threads) rather than
        whenever the garbage collector reaches its reference cycles, so a second engine in the
        same process profiles a clean device. The LLM cannot generate afterwards."""
        engine = self.__dict__.pop("engine", None)
        if engine is None:
            return
        if engine.structured is not None:
            engine.structured.shutdown()
        del engine
        gc.collect()
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's rule: with `generation_config="auto"`, the model's own defaults apply."""
        if self.config.model_config.generation_config != "auto":
            return SamplingParams()
        return SamplingParams(**generation_defaults(self.engine.files.generation_config))

    # ---- public API ----------------------------------------------------------------------------
    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool = False, priority: Sequence[int] | None = None
                 ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in input order."""
        prompt_list = self._as_prompt_list(prompts)
        params_list = self._as_params_list(sampling_params, len(prompt_list))
        token_lists = [self._tokenize_prompt(p) for p in prompt_list]
        texts = [p if isinstance(p, str) else (p.get("prompt") if isinstance(p, dict) else None)
                 for p in prompt_list]
        return self._run(texts, token_lists, params_list, use_tqdm, priority)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             use_tqdm: bool = False, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Apply the chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        texts = [self.tokenizer.apply_chat_template(
            conv, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tools=tools,
            chat_template=chat_template, template_kwargs=chat_template_kwargs)
            for conv in conversations]
        token_lists = [self.tokenizer.chat_prompt_ids(t) for t in texts]
        params_list = self._as_params_list(sampling_params, len(texts))
        return self._run(list(texts), token_lists, params_list, use_tqdm, None)

    def beam_search(self, prompts: PromptType | Sequence[PromptType],
                    params: BeamSearchParams) -> list[RequestOutput]:
        """Beam search; each result's outputs are the best `beam_width` beams, best first."""
        prompt_list = self._as_prompt_list(prompts)
        token_lists = [self._tokenize_prompt(p) for p in prompt_list]
        eos = frozenset() if params.ignore_eos else self.engine.info.eos_token_ids
        states = []
        for ids in token_lists:
            check_prompt(ids, self.max_model_len, self.engine.info.vocab_size)
            capped = BeamSearchParams(**{**params.__dict__, "max_tokens": resolve_max_tokens(
                params.max_tokens, None, len(ids), self.max_model_len)})
            states.append(BeamSearchState(capped, eos))
        step = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False,
                              logprobs=min(2 * params.beam_width, self.config.max_logprobs))
        while not all(s.done for s in states):
            live = [(k, beam) for k, s in enumerate(states) if not s.done for beam in s.running]
            outs = self._run([None] * len(live),
                             [token_lists[k] + beam.tokens for k, beam in live],
                             [step] * len(live), False, None)
            per_state: dict[int, list[list[tuple[int, float]]]] = {}
            for (k, _), out in zip(live, outs):
                if out.outputs[0].error is not None:
                    raise RequestFailedError(out.outputs[0].error)
                assert out.outputs[0].logprobs is not None  # requested: one step's logprobs
                entry = out.outputs[0].logprobs[0]
                per_state.setdefault(k, []).append([(t, lp.logprob) for t, lp in entry.items()])
            for k, candidates in per_state.items():
                states[k].advance(candidates)
        results = []
        for ids, prompt, state in zip(token_lists, prompt_list, states):
            beams = [CompletionOutput(i, self.tokenizer.decode(b.tokens), b.tokens,
                                      b.finish_reason, None, None, b.cum_logprob)
                     for i, b in enumerate(state.best())]
            results.append(RequestOutput(str(next(self._counter)),
                                         prompt if isinstance(prompt, str) else None, ids,
                                         beams, finished=True))
        return results

    # ---- internals -----------------------------------------------------------------------------
    @staticmethod
    def _as_prompt_list(prompts: Any) -> list[PromptType]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # one prompt given as token ids
        return prompts

    def _as_params_list(self, params: Any, n: int) -> list[SamplingParams]:
        if params is None:
            params = self.get_default_sampling_params()
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise RequestError(f"got {len(params)} sampling params for {n} prompts",
                               "sampling_params")
        return params

    def _tokenize_prompt(self, prompt: PromptType) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenizer.encode(prompt["prompt"])
            raise RequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'", "prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise RequestError(f"unsupported prompt type {type(prompt).__name__}", "prompt")

    @staticmethod
    def _failed_output(request_id: str, index: int, error: str) -> CompletionOutput:
        """The output of a request the engine failed: finish_reason "error" and why."""
        logger.warning("%s", error)
        return CompletionOutput(index, "", [], finish_reason="error", error=error)

    def _abandon(self, request_ids: list[str]) -> None:
        """Abort these requests in the engine and forget their text state."""
        try:
            self.engine.abort_requests(request_ids)
        finally:
            for rid in request_ids:
                self.processor.abort(rid)

    def _run(self, texts: list[str | None], token_lists: list[list[int]],
             params_list: list[SamplingParams], use_tqdm: bool,
             priority: Sequence[int] | None) -> list[RequestOutput]:
        results: list[RequestOutput] = []
        sub_to_parent: dict[str, tuple[int, int]] = {}
        pending: list[tuple[EngineCoreRequest, int]] = []
        prepared: dict[int, SamplingParams] = {}  # validated once each, here at the edge
        for i, (text, ids, params) in enumerate(zip(texts, token_lists, params_list)):
            rid = str(next(self._counter))
            if id(params) not in prepared:
                prepared[id(params)] = prepare_sampling_params(
                    params, self.tokenizer, self.engine.info.vocab_size, self.config.max_logprobs)
            params = prepared[id(params)]
            ids = truncate_prompt(ids, params.truncate_prompt_tokens, self.max_model_len)
            check_prompt(ids, self.max_model_len, self.engine.info.vocab_size)
            children = child_requests(rid, ids, params, self.max_model_len,
                                      priority=priority[i] if priority else 0)
            results.append(RequestOutput(rid, text, ids, outputs=[None] * len(children)))  # type: ignore[list-item]
            for j, req in enumerate(children):
                self.engine.validate_request(req)  # refuse the whole batch before adding any
                pending.append((req, j))
                sub_to_parent[req.request_id] = (i, j)
        remaining = len(sub_to_parent)
        for req, j in pending:
            try:
                self.engine.add_request(req)
            except Exception as exc:  # noqa: BLE001 - validated above: the engine failed it
                i, _ = sub_to_parent[req.request_id]
                results[i].outputs[j] = self._failed_output(
                    req.request_id, j, f"request {req.request_id} failed while being admitted: "
                    f"{type(exc).__name__}: {exc}")
                remaining -= 1
                continue
            self.processor.add_request(req.request_id, j, req.sampling_params,
                                       req.prompt_token_ids)
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=remaining, desc="Processed requests", unit="req")
        try:
            while remaining:
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError("the engine finished without completing every request")
                outputs = self.engine.step()
                errors = {o.request_id: o.error for o in outputs if o.error is not None}
                touched, to_abort = self.processor.process(outputs)
                if to_abort:
                    self.engine.abort_requests(to_abort)
                for state in touched:
                    if not state.finished:
                        continue
                    i, j = sub_to_parent[state.request_id]
                    results[i].outputs[j] = state.to_output()
                    if state.request_id in errors:
                        results[i].outputs[j].error = errors[state.request_id]
                        logger.warning("%s", errors[state.request_id])
                    if j == 0 and state.prompt_logprobs is not None:
                        results[i].prompt_logprobs = state.prompt_logprobs
                    results[i].num_cached_tokens = max(results[i].num_cached_tokens,
                                                       state.num_cached_tokens)
                    remaining -= 1
                    if progress is not None:
                        progress.update(1)
        except BaseException:  # the engine failed (or Ctrl-C): leave nothing of this call in it
            self._abandon(list(sub_to_parent))
            raise
        finally:
            if progress is not None:
                progress.close()
        for out, params in zip(results, params_list):
            out.finished = True
            if len(out.outputs) > params.n:  # best_of: keep the n most likely candidates
                best = sorted(out.outputs, key=lambda o: o.cumulative_logprob or 0.0,
                              reverse=True)[: params.n]
                for index, choice in enumerate(best):
                    choice.index = index
                    if params.logprobs is None:
                        choice.logprobs, choice.cumulative_logprob = None, None
                out.outputs = best
        return results
