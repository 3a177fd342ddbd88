"""API keys: the server's keys, the key a request presents, the constant-time check and its 401
(API workers, `fornax serve`'s main process, and the Ray Serve ingress: one rule for both).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from fornax.api.server.errors import APIError
from fornax.runtime import env
from fornax.runtime.errors import ConfigError


def server_keys(flags: list[str] | None) -> list[str]:
    """The keys a server accepts: the --api-key flags (or the config's `api_key`), else
    FORNAX_API_KEY, else VLLM_API_KEY; none: no key is needed. ConfigError for an empty flag
    key or one with spaces at either end (an empty variable means none, as in vLLM)."""
    keys = list(flags or [])
    for key in keys:  # an empty key would let in `Authorization: Bearer` with no key at all;
        # a padded one could never match (the presented key is stripped)
        if not key or key != key.strip():
            raise ConfigError(f"--api-key (api_key) {key!r}: a key must be non-empty, without "
                              "spaces at either end")
    for var in (env.API_KEY, env.VLLM_API_KEY):
        if not keys and (value := var.get()):
            keys = [value]
    return keys


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The API key a request sent (`headers`: lower-case names): `Authorization: Bearer <key>`,
    else `x-api-key: <key>` (Anthropic clients); None when it sent neither."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return token.strip()
    if "x-api-key" in headers:
        return headers["x-api-key"].strip()
    return None


def key_matches(given: bytes | str, keys: list[bytes]) -> bool:
    """Whether `given` is one of `keys`, in constant time: every key is compared, no early exit."""
    if isinstance(given, str):
        given = given.encode("utf-8", "replace")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key)
    return ok


def unauthorized() -> APIError:
    return APIError(401, "Unauthorized: a valid API key is required "
                    "(Authorization: Bearer <key>, or x-api-key: <key>)",
                    type="AuthenticationError")
