"""Bounds on every client-supplied value, in one place: machine ranges, list and string caps,
the request-id charset and the JSON depth limit (torch-free; any process).

The constants are the defaults; `InputLimits` carries the few that operators can change with a
flag (`fornax serve --max-stop-strings ...`) from `serve` to every API worker.
"""

from __future__ import annotations

import re

import msgspec
import numpy as np

# ---- machine ranges: values that end up in numpy / torch tensors ------------------------------
INT32_MAX = 2**31 - 1
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# ---- fan-out ------------------------------------------------------------------------------------
MAX_N = 128  # n, best_of and beam width share this cap (--max-n)
MAX_CHOICES_PER_REQUEST = 4096  # prompts x max(n, best_of): engine requests one call may make
MAX_PROMPTS = 1024  # prompts in one completions request (a batch of prompts)
MAX_CONVERSATIONS = 256  # conversations in one /v1/chat/completions/batch request
MAX_POOLING_INPUTS = 2048  # inputs of one embeddings / pooling / classify / score request
MAX_SERVED_MODELS = 16  # models of one server (--models, or models: in --config)
MAX_RAY_REPLICAS = 1024  # replicas of one model's Ray Serve deployment (fornax serve-ray)
MAX_RAY_QUEUED = 1_000_000  # a Ray deployment's max_ongoing/max_queued_requests
RAY_INGRESS_BODY_BYTES = 64 * 1024 * 1024  # a body the Ray ingress holds before forwarding
MAX_LOAD_WAITERS = 256  # requests of one API worker waiting for one model to load
MAX_KEEP_ALIVE_S = 7 * 24 * 3600  # a request's keep_alive (seconds; negative: stay loaded)
MAX_IDLE_TIMEOUT_S = 30 * 24 * 3600  # --idle-timeout
MIN_LOADED_MEMORY_BYTES = 64 * 2**20  # --max-loaded-memory (less is a unit mistake: 0 is off)
MAX_LOADED_MEMORY_BYTES = 2**50  # --max-loaded-memory: 1 PiB

# ---- sampling lists and strings -----------------------------------------------------------------
MAX_STOP_STRINGS = 64  # --max-stop-strings
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # entries
MAX_BAD_WORDS = 256
MAX_BAD_WORD_CHARS = 1024
MAX_ALLOWED_TOKEN_IDS = 262_144  # and never more than the vocabulary
MAX_CHOICE_OPTIONS = 1024  # structured-output choice lists
MAX_CHOICE_CHARS = 4096  # one choice
MAX_GRAMMAR_CHARS = 256 * 1024  # raw regex / grammar / JSON schema / structural tag text
MAX_REPETITION_PATTERN_SIZE = 128  # repetition_detection.max_pattern_size
MAX_REPETITION_MIN_COUNT = 32  # repetition_detection.min_count
LOGIT_BIAS_RANGE = 100.0  # OpenAI's: each bias in [-100, 100]

# ---- identifiers and free text ------------------------------------------------------------------
MAX_REQUEST_ID_CHARS = 256
MAX_CACHE_SALT_CHARS = 1024
MAX_USER_CHARS = 1024
MAX_CHAT_TEMPLATE_CHARS = 128 * 1024  # a request's own chat template (needs a trust flag anyway)
MAX_MESSAGES = 8192  # messages of one conversation
MAX_TOOLS = 512  # tool definitions of one request
MAX_DOCUMENTS = 1024  # chat `documents` (RAG templates)
MAX_DETOKENIZE_TOKENS = 1 << 20  # token ids one /detokenize request may turn into text
MAX_VLLM_XARGS = 64  # vllm_xargs entries (a key, then a value or a list of values)
MAX_VLLM_XARGS_CHARS = 4096  # one vllm_xargs key or string value
MAX_THINKING_TOKEN_BUDGET = 1 << 30  # thinking_token_budget / thinking.budget_tokens

# ---- request bodies -----------------------------------------------------------------------------
MAX_JSON_DEPTH = 128  # arrays and objects nested deeper are a 400 on every JSON route
# tokenization / template rendering above this many characters runs off the event loop
OFFLOAD_CHARS = 64 * 1024
LOG_FIELD_CHARS = 512  # request logging truncates what it prints to this many characters

REQUEST_ID_PATTERN = r"\A[!-~](?:[ -~]*[!-~])?\Z"  # printable ASCII, no CR/LF, no edge spaces
_REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)


class InputLimits(msgspec.Struct, frozen=True, omit_defaults=True):
    """The limits operators can change, handed from `serve` to the API workers."""

    max_n: int = MAX_N
    max_stop_strings: int = MAX_STOP_STRINGS
    max_prompts: int = MAX_PROMPTS


DEFAULT_LIMITS = InputLimits()


def request_id_problem(value: object) -> str | None:
    """Why `value` cannot be a request id (echoed in headers and response ids), or None."""
    if not isinstance(value, str):
        return "request_id must be a string"
    if len(value) > MAX_REQUEST_ID_CHARS:
        return f"request_id must be at most {MAX_REQUEST_ID_CHARS} characters"
    if not _REQUEST_ID_RE.match(value):
        return ("request_id must be printable ASCII (no control characters such as CR/LF, no "
                "non-ASCII text, no leading or trailing spaces)")
    return None


def clip_for_log(value: object, limit: int = LOG_FIELD_CHARS) -> str:
    """`repr(value)` cut to `limit` characters, so request logging stays bounded."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_CHUNK = 1 << 20  # brackets per numpy pass: bounded scratch memory for any body size


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when arrays/objects in the JSON text `body` nest deeper than `limit`.

    One linear pass at C speed: strings are cut out, the brackets kept, and the running depth
    (+1 per opener, -1 per closer) summed chunk by chunk. Bytes that are not valid JSON are not
    this function's business (the decoder rejects them)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    if b'"' in body:
        body = _STRING_RE.sub(b"", body)
    shape = np.frombuffer(body.translate(None, _NOT_BRACKETS), dtype=np.uint8)
    depth = 0
    for start in range(0, len(shape), _DEPTH_CHUNK):
        chunk = shape[start:start + _DEPTH_CHUNK]
        steps = np.where((chunk == ord("[")) | (chunk == ord("{")), 1, -1).astype(np.int32)
        running = np.cumsum(steps, dtype=np.int64) + depth
        if int(running.max()) > limit:
            return True
        depth = int(running[-1])
    return False
