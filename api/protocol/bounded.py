"""Bounded field types for the request structs: msgspec checks them while decoding, so an
oversized or unsafe value is a 400 naming the field before any work (API workers).

The bounds themselves live in fornax.runtime.limits; decoding-time checks cover what is not a
decoding setting (ids, free text, list sizes). Decoding settings are checked by
SamplingParams.validate, once.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta

from fornax.runtime import limits as L

# printable ASCII only (no CR/LF, no U+2028, no non-Latin-1 text): it is echoed in headers and ids
RequestId = Annotated[str, Meta(min_length=1, max_length=L.MAX_REQUEST_ID_CHARS,
                                pattern=L.REQUEST_ID_PATTERN)]
CacheSalt = Annotated[str, Meta(max_length=L.MAX_CACHE_SALT_CHARS)]
User = Annotated[str, Meta(max_length=L.MAX_USER_CHARS)]
ChatTemplate = Annotated[str, Meta(max_length=L.MAX_CHAT_TEMPLATE_CHARS)]
Messages = Annotated[list[dict[str, Any]], Meta(max_length=L.MAX_MESSAGES)]
Tools = Annotated[list[dict[str, Any]], Meta(max_length=L.MAX_TOOLS)]
Documents = Annotated[list[dict[str, Any]], Meta(max_length=L.MAX_DOCUMENTS)]
Int64 = Annotated[int, Meta(ge=L.INT64_MIN, le=L.INT64_MAX)]
DetokenizeTokens = Annotated[list[int], Meta(max_length=L.MAX_DETOKENIZE_TOKENS)]

# vllm_xargs: vLLM's extension arguments (a string or number, or a list of them, per key)
_XargStr = Annotated[str, Meta(max_length=L.MAX_VLLM_XARGS_CHARS)]
_XargScalar = _XargStr | int | float
VllmXargs = Annotated[
    dict[Annotated[str, Meta(max_length=L.MAX_VLLM_XARGS_CHARS)],
         _XargScalar | Annotated[list[_XargScalar], Meta(max_length=L.MAX_VLLM_XARGS)]],
    Meta(max_length=L.MAX_VLLM_XARGS)]
# -1: unlimited (vLLM's "unset"); 0: no thinking at all
ThinkingBudget = Annotated[int, Meta(ge=-1, le=L.MAX_THINKING_TOKEN_BUDGET)]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
TruncationSide = Literal["left", "right"]
