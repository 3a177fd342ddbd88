"""Request preparation of large requests (template rendering, tokenization) off the API
worker's event loop, in a small thread pool, so one huge prompt does not stall every stream
(API workers)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fornax.api.server.http import Request
from fornax.runtime.limits import OFFLOAD_CHARS

T = TypeVar("T")

_POOL: ThreadPoolExecutor | None = None
_POOL_THREADS = 2  # preparation beyond this waits its turn; the event loop never does


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="fornax-prep")
    return _POOL


async def prepare(req: Request, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """`fn(*args, **kwargs)`: inline for a small request body, in the preparation pool for one
    of OFFLOAD_CHARS bytes or more (the body read first, so its size is known)."""
    size = len(await req.body())
    if size < OFFLOAD_CHARS:
        return fn(*args, **kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_pool(), functools.partial(fn, *args, **kwargs))
