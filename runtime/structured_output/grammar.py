"""Structured output with xgrammar: compile constraints (cached), one matcher per request, and
the batch's token bitmask (engine-core process)."""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fornax.runtime.config import StructuredOutputsConfig
from fornax.runtime.errors import RequestError
from fornax.runtime.sampling.params import StructuredOutputsParams
from fornax.runtime.structured_output.grammar_cache import Failure, GrammarCache, digest
from fornax.runtime.structured_output.grammar_pool import (
    CompileJob,
    GrammarBusy,
    GrammarCompilePool,
    GrammarTooComplex,
)

if TYPE_CHECKING:
    import xgrammar as xgr

logger = logging.getLogger(__name__)


def _vocab_type(tokenizer_json: dict[str, Any]) -> xgr.VocabType:
    import xgrammar as xgr

    decoder = json.dumps(tokenizer_json.get("decoder") or {})
    if '"ByteLevel"' in decoder:
        return xgr.VocabType.BYTE_LEVEL
    if '"ByteFallback"' in decoder:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


def _choice_grammar(choices: list[str]) -> str:
    alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)  # no \ud83d pairs
    return f"root ::= {alts}"


# xgrammar (0.2.x) gives length-limited JSON strings (minLength/maxLength) the character class
# [^"\\\r\n], which admits raw control characters (\t, \x06, ...) that JSON forbids inside
# strings, so strict parsers reject the output; narrow it to what JSON allows unescaped.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'


def _strict_json_strings(grammar: xgr.Grammar) -> xgr.Grammar:
    import xgrammar as xgr

    text = str(grammar)
    if _LOOSE_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))


class StructuredOutputManager:
    """Compiles constraints once per distinct spec, off the busy loop, and makes matchers.

    Compiles run on a bounded pool with a time limit (runtime/structured_output/grammar_pool.py); results go to a
    cache bounded in bytes (runtime/structured_output/grammar_cache.py). The server's input side calls `prepare`
    (never blocks: the request waits for its job, other requests run on); `compile` and
    `new_matcher` then find the grammar cached and pinned. Offline use may call `compile`
    directly, which waits for the compile (within the same time limit).
    """

    def __init__(self, model_dir: Path, vocab_size: int, eos_token_ids: frozenset[int],
                 limits: StructuredOutputsConfig | None = None) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.limits = limits or StructuredOutputsConfig()
        self._compiler = None
        self._lock = threading.Lock()
        self.cache = GrammarCache(self.limits.grammar_cache_bytes,
                                  self.limits.grammar_max_failures)
        self._inflight: dict[bytes, CompileJob] = {}  # spec digest -> its running compile
        self._holds: dict[bytes, int] = {}  # requests that will want the grammar pinned
        self._compiles = GrammarCompilePool(self.limits)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")  # bitmasks
        self._ready: Future[xgr.GrammarCompiler] | None = None

    def prewarm(self) -> None:
        """Import xgrammar and build the tokenizer info in the background. The first
        constrained request does (its compile waits for it, outside its time limit): xgrammar
        and the transformers it imports hold ~50 MiB that a server which never constrains
        output does not need, and take ~2 s to load on a quiet 2-core CPU."""
        with self._lock:
            if self._ready is None:
                self._ready = self._pool.submit(self._make_compiler)

    def _make_compiler(self) -> xgr.GrammarCompiler:
        import xgrammar as xgr

        tok = json.loads((self.model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        vocab: dict[str, int] = dict(tok["model"]["vocab"])
        for added in tok.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
        encoded = [""] * self.vocab_size
        for text, tid in vocab.items():
            if tid < self.vocab_size:
                encoded[tid] = text
        info = xgr.TokenizerInfo(encoded, vocab_type=_vocab_type(tok), vocab_size=self.vocab_size,
                                 stop_token_ids=self.eos_token_ids, add_prefix_space=False)
        # xgrammar's own cache is unbounded by default; ours (bounded in bytes) replaces it
        return xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def prepare(self, params: StructuredOutputsParams) -> CompileJob | None:
        """For a request about to be admitted, without blocking: None when the spec is cached
        (the grammar is pinned for the request until `new_matcher`; a refused spec is
        refused now with RequestError), else the job compiling it, which caches and pins the
        grammar before its other callbacks run. GrammarBusy when the pool is full."""
        key = digest(params.cache_key())
        with self._lock:
            hit = self.cache.get(key, pin=True)
            if isinstance(hit, Failure):
                raise RequestError(hit.message, constraint_param(params))
            if hit is not None:
                return None
            job = self._inflight.get(key) or self._submit(key, params)
            self._holds[key] = self._holds.get(key, 0) + 1
            return job

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar (cached); an invalid or too complex spec raises RequestError
        naming the request's field. On a miss this waits for the pool (offline use)."""
        key = digest(params.cache_key())
        with self._lock:  # with _finish's update: a miss here means a job is, or will be, ours
            hit = self.cache.get(key)
            try:
                job = None if hit is not None else (
                    self._inflight.get(key) or self._submit(key, params))
            except GrammarBusy as exc:
                raise RequestError(f"grammar compiler busy: {exc}",
                                   constraint_param(params)) from None
        if job is not None:
            try:
                return job.wait()
            except Exception as exc:  # noqa: BLE001 - every failure is the request's 400
                raise RequestError(failure_message(params.kind, exc),
                                   constraint_param(params)) from None
        if isinstance(hit, Failure):
            raise RequestError(hit.message, constraint_param(params))  # refused again at once
        return hit

    def unpin(self, params: StructuredOutputsParams) -> None:
        """The request no longer needs its grammar held (a refused or aborted request)."""
        self.cache.unpin(digest(params.cache_key()))

    def _submit(self, key: bytes, params: StructuredOutputsParams) -> CompileJob:
        """Start compiling `params` (lock held): one job per spec, whoever else waits on it."""
        job = self._compiles.submit(partial(self._compile_in_pool, params),
                                    on_done=partial(self._finish, key, params.kind),
                                    setup=self._compiler_ready)
        self._inflight[key] = job
        return job

    def _compiler_ready(self) -> xgr.GrammarCompiler:
        self.prewarm()
        assert self._ready is not None  # prewarm set it
        return self._ready.result()

    def _compile_in_pool(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        return self._compile(self._compiler_ready(), params)

    def _finish(self, key: bytes, kind: str, job: CompileJob) -> None:
        """Runs first when a compile ends or times out: cache the grammar (pinned for every
        request that waits on it) or the failure (a busy pool is not remembered)."""
        with self._lock:
            self._inflight.pop(key, None)
            holds = self._holds.pop(key, 0)
            if job.error is None:
                self.cache.put(key, job.result, pins=holds)
            elif not isinstance(job.error, GrammarBusy):
                if isinstance(job.error, GrammarTooComplex):
                    logger.warning("a %s constraint is too complex: %s", kind, job.error)
                self.cache.put(key, Failure(failure_message(kind, job.error)))

    def _compile(self, compiler: xgr.GrammarCompiler,
                 p: StructuredOutputsParams) -> xgr.CompiledGrammar:
        import xgrammar as xgr

        any_ws = not p.disable_any_whitespace
        if p.kind == "json":
            schema = p.json if isinstance(p.json, str) else json.dumps(p.json)
            try:
                json.loads(schema)
            except json.JSONDecodeError as exc:
                raise RequestError(f"the JSON schema is not valid JSON: {exc}",
                                   "structured_outputs.json") from exc
            grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=any_ws,
                                                   strict_mode=True)
            return compiler.compile_grammar(_strict_json_strings(grammar))
        if p.kind == "json_object":
            return compiler.compile_builtin_json_grammar()
        if p.kind == "regex":
            assert p.regex is not None  # validated: the kind's own field is set
            return compiler.compile_regex(p.regex)
        if p.kind == "choice":
            return compiler.compile_grammar(_choice_grammar(p.choice or []))
        if p.kind == "grammar":
            assert p.grammar is not None  # validated: the kind's own field is set
            return compiler.compile_grammar(p.grammar)
        tag = p.structural_tag if isinstance(p.structural_tag, str) else json.dumps(
            p.structural_tag)
        return compiler.compile_grammar(_strict_json_strings(xgr.Grammar.from_structural_tag(tag)))

    def new_matcher(self, params: StructuredOutputsParams) -> xgr.GrammarMatcher:
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(self.compile(params))
        self.unpin(params)  # the matcher holds the grammar now
        return matcher

    def submit(self, fn, *args) -> Future:
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        self._compiles.shutdown()
        self._pool.shutdown(wait=False, cancel_futures=True)


def constraint_param(params: StructuredOutputsParams) -> str:
    """The request field a constraint came from (response_format, guided_json, tools, ...)."""
    return getattr(params, "source", None) or f"structured_outputs.{params.kind}"


def failure_message(kind: str, exc: BaseException) -> str:
    if isinstance(exc, GrammarTooComplex):
        return f"grammar too complex: the {kind} constraint {exc}"
    if isinstance(exc, GrammarBusy):
        return f"grammar compiler busy: {exc}"
    if isinstance(exc, RequestError):
        return str(exc)
    return f"invalid {kind} constraint: {exc}"  # xgrammar raises RuntimeError/ValueError


def fill_bitmask(matchers: list[xgr.GrammarMatcher | None], vocab_size: int) -> torch.Tensor:
    """[len(matchers), ceil(vocab/32)] int32 bitmask; rows with no matcher allow everything."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
    for row, matcher in enumerate(matchers):
        if matcher is not None and not matcher.is_terminated():
            matcher.fill_next_token_bitmask(bitmask, row)
    return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Disallowed tokens of the constrained rows become -inf (in place)."""
    import xgrammar as xgr

    bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=rows)
