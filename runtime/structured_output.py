"""Structured output with xgrammar: compile constraints (cached), one matcher per request, and
the batch's token bitmask (engine-core process)."""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fornax.runtime.errors import RequestError
from fornax.runtime.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

_MAX_CACHED = 1024  # distinct constraints kept compiled (oldest dropped first)


def _vocab_type(tokenizer_json: dict[str, Any]) -> Any:
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


def _strict_json_strings(grammar: Any) -> Any:
    import xgrammar as xgr

    text = str(grammar)
    if _LOOSE_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))


class StructuredOutputManager:
    """Compiles constraints once per distinct spec, off the busy loop, and makes matchers."""

    def __init__(self, model_dir: Path, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._compiler = None
        self._lock = threading.Lock()
        self._cache: dict[str, Any] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")
        self._ready: Future | None = None

    def prewarm(self) -> None:
        """Import xgrammar and build the tokenizer info in the background (a server calls this
        after start-up; offline use pays it on the first constrained request instead)."""
        with self._lock:
            if self._ready is None:
                self._ready = self._pool.submit(self._make_compiler)

    def _make_compiler(self) -> Any:
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
        return xgr.GrammarCompiler(info, max_threads=2)

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar (cached); an invalid spec raises RequestError with its message."""
        key = params.cache_key()
        with self._lock:
            hit = self._cache.get(key)
        if isinstance(hit, RequestError):
            raise hit  # a spec that failed once fails again at once
        if hit is not None:
            return hit
        self.prewarm()
        compiler = self._ready.result()  # type: ignore[union-attr]
        try:
            compiled = self._compile(compiler, params)
        except RequestError as exc:
            compiled = exc
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the reason
            compiled = RequestError(f"invalid {params.kind} constraint: {exc}",
                                    f"structured_outputs.{params.kind}")
        with self._lock:
            if len(self._cache) >= _MAX_CACHED:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = compiled
        if isinstance(compiled, RequestError):
            raise compiled
        return compiled

    def _compile(self, compiler: Any, p: StructuredOutputsParams) -> Any:
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
            return compiler.compile_regex(p.regex)
        if p.kind == "choice":
            return compiler.compile_grammar(_choice_grammar(p.choice or []))
        if p.kind == "grammar":
            return compiler.compile_grammar(p.grammar)
        tag = p.structural_tag if isinstance(p.structural_tag, str) else json.dumps(
            p.structural_tag)
        return compiler.compile_grammar(_strict_json_strings(xgr.Grammar.from_structural_tag(tag)))

    def new_matcher(self, params: StructuredOutputsParams) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(params))

    def submit(self, fn, *args) -> Future:
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def fill_bitmask(matchers: list[Any], vocab_size: int) -> torch.Tensor:
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


def allowed_mask_np(bitmask: torch.Tensor, vocab_size: int) -> np.ndarray:
    """Bitmask rows as booleans, for tests and debugging."""
    bits = bitmask.numpy().view(np.uint32)
    unpacked = ((bits[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(bool)
    return unpacked.reshape(bitmask.shape[0], -1)[:, :vocab_size]
