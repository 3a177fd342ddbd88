"""The answer of the render routes, in vLLM's shape (msgspec; API workers)."""

from __future__ import annotations

from typing import Any

from msgspec import Struct

from fornax.api.protocol.openai import StreamOptions


class GenerateRequest(Struct):
    """A rendered request as vLLM's /v1/chat/completions/render answers it (one per prompt for
    /v1/completions/render): the token ids and sampling parameters the engine would get.
    `prompt` (the rendered text) is fornax's addition; `features` stays null (text only)."""

    request_id: str
    token_ids: list[int]
    sampling_params: dict[str, Any]
    features: str | None = None
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_salt: str | None = None
    priority: int = 0
    kv_transfer_params: dict[str, Any] | None = None
    prompt: str | None = None
