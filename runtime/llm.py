"""Offline `LLM` API: the engine core in-process, vLLM's `generate` / `chat` shape (one process)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

from fornax.runtime.config import make_engine_config
from fornax.runtime.engine_core import EngineCore
from fornax.runtime.errors import RequestError
from fornax.runtime.messages import EngineCoreRequest
from fornax.runtime.output_processor import OutputProcessor
from fornax.runtime.outputs import RequestOutput
from fornax.runtime.sampling_params import SamplingParams
from fornax.runtime.tokenizer import TokenizerFront

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict[str, Any]
_GEN_CONFIG_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "min_p": "min_p", "max_new_tokens": "max_tokens"}


class LLM:
    """Generate text from prompts with continuous batching, without a server.

    `LLM()` with no model loads the packaged default (SmolLM2-135M-Instruct).
    """

    def __init__(self, model: str | None = None, *, chat_template: str | None = None,
                 **engine_args: Any) -> None:
        engine_args.setdefault("device", "auto")
        self.config = make_engine_config(model or "", **engine_args)
        self.engine = EngineCore(self.config)
        self.tokenizer = TokenizerFront(self.engine.files.path, chat_template)
        self.processor = OutputProcessor(self.tokenizer)
        self._counter = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's rule: with `generation_config="auto"`, the model's own defaults apply."""
        if self.config.model_config.generation_config != "auto":
            return SamplingParams()
        gen = self.engine.files.generation_config
        overrides = {ours: gen[theirs] for theirs, ours in _GEN_CONFIG_KEYS.items() if theirs in gen}
        if gen.get("do_sample") is False:
            overrides.pop("temperature", None)
        return SamplingParams(**overrides) if overrides else SamplingParams()

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
            conv, add_generation_prompt=add_generation_prompt,  # type: ignore[arg-type]
            continue_final_message=continue_final_message, tools=tools,
            chat_template=chat_template, template_kwargs=chat_template_kwargs)
            for conv in conversations]
        token_lists = [self.tokenizer.chat_prompt_ids(t) for t in texts]
        params_list = self._as_params_list(sampling_params, len(texts))
        return self._run(list(texts), token_lists, params_list, use_tqdm, None)

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

    def _run(self, texts: list[str | None], token_lists: list[list[int]],
             params_list: list[SamplingParams], use_tqdm: bool,
             priority: Sequence[int] | None) -> list[RequestOutput]:
        results: list[RequestOutput] = []
        sub_to_parent: dict[str, tuple[int, int]] = {}
        pending: list[tuple[EngineCoreRequest, int]] = []
        for i, (text, ids, params) in enumerate(zip(texts, token_lists, params_list)):
            rid = str(next(self._counter))
            results.append(RequestOutput(rid, text, ids, outputs=[None] * params.n))  # type: ignore[list-item]
            for j in range(params.n):
                sub_params = params if params.n == 1 else params.clone(
                    n=1, seed=None if params.seed is None else params.seed + j)
                sub_id = rid if params.n == 1 else f"{rid}-{j}"
                req = EngineCoreRequest(sub_id, ids, sub_params,
                                        priority=priority[i] if priority else 0)
                self.engine.validate_request(req)  # refuse the whole batch before adding any
                pending.append((req, j))
                sub_to_parent[sub_id] = (i, j)
        for req, j in pending:
            self.engine.add_request(req)
            self.processor.add_request(req.request_id, j, req.sampling_params,
                                       req.prompt_token_ids)
        remaining = len(sub_to_parent)
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=remaining, desc="Processed requests", unit="req")
        while remaining:
            touched, to_abort = self.processor.process(self.engine.step())
            if to_abort:
                self.engine.abort_requests(to_abort)
            for state in touched:
                if not state.finished:
                    continue
                i, j = sub_to_parent[state.request_id]
                results[i].outputs[j] = state.to_output()
                results[i].num_cached_tokens = max(results[i].num_cached_tokens,
                                                   state.num_cached_tokens)
                remaining -= 1
                if progress is not None:
                    progress.update(1)
        if progress is not None:
            progress.close()
        for out in results:
            out.finished = True
        return results
