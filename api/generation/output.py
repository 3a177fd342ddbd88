"""What chat and completions share on the way out: the collector that gathers a Generation's
choices for a JSON answer, and the SSE framing of a stream of typed chunks (API workers)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fornax.api.generation.generate import Generation
from fornax.api.server.errors import APIError
from fornax.api.server.http import SSE_DONE, sse
from fornax.runtime.offline.outputs import Logprob

logger = logging.getLogger(__name__)


@dataclass
class Collected:
    """One candidate's whole output (text, finish, and the logprob entries of its tokens)."""

    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


async def collect(gen: Generation) -> list[Collected]:
    """Run the generation to its end; each candidate's output, by candidate index."""
    out = [Collected() for _ in range(gen.num_candidates)]
    async for batch in gen.updates():
        for u in batch:
            c = out[u.index]
            c.text += u.text
            c.finish_reason, c.stop_reason = u.finish_reason, u.stop_reason
            c.token_ids.extend(u.token_ids)
            if u.logprobs:
                c.logprobs.extend(u.logprobs)
    return out


async def sse_stream(chunks: AsyncIterator[object], label: str) -> AsyncIterator[bytes]:
    """Each chunk as an SSE event, then `[DONE]`; a failure mid-stream sends an error event
    first (the status is already sent), as OpenAI clients expect."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except APIError as exc:
        yield sse(exc.to_response())
    except Exception:  # a bug: still end the stream the way clients expect
        logger.exception("stream %s failed", label)
        yield sse(APIError(500, "internal server error").to_response())
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    yield SSE_DONE
