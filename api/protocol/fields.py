"""Request keys a struct does not declare, as vLLM treats them (API workers): a vLLM field fornax
refuses is a 400 naming it, one it ignores passes quietly, and any other key is ignored with one
warning per field name per process (never per request), so that a misspelt field shows up in the
server log once instead of silently doing nothing.

The statuses come from the inventory, api/protocol/vllm_fields.py. Only the top level of a body
is checked (nested objects keep msgspec's rule: unknown keys are skipped).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from fornax.api.protocol.vllm_fields import CHAT, INVENTORY, REJECTED, FieldStatus
from fornax.api.server.errors import APIError

logger = logging.getLogger(__name__)

MAX_WARNED_NAMES = 1024  # distinct unknown names remembered; past this, one last line and quiet
_NAME_CHARS = 64  # an unknown name is logged clipped to this many characters

# Surfaces that hand the keys they do not define on to the chat path (vLLM's sampling extras).
_PASSES_TO_CHAT = frozenset({"ResponsesRequest", "MessagesRequest"})

_keys = msgspec.json.Decoder(dict[str, msgspec.Raw])
_declared: dict[type, frozenset[str]] = {}
_warned: set[str] = set()
_lock = threading.Lock()


def _not_forwarded() -> dict[str, frozenset[str]]:
    from fornax.api.protocol.responses import RESPONSES_ONLY_FIELDS

    return {"ResponsesRequest": RESPONSES_ONLY_FIELDS}


def _chat_fields() -> frozenset[str]:
    from fornax.api.protocol.openai import ChatCompletionRequest

    return frozenset(ChatCompletionRequest.__struct_fields__)


def warn_unknown(name: str, where: str) -> bool:
    """Log that `name` was ignored, the first time this process sees that name; True when a line
    was logged."""
    key = name[:_NAME_CHARS]
    with _lock:
        if key in _warned or len(_warned) > MAX_WARNED_NAMES:
            return False
        _warned.add(key)
        full = len(_warned) > MAX_WARNED_NAMES
    logger.warning("ignoring request field %r of %s: it is not a vLLM or fornax field (logged "
                   "once per field name)", key, where)
    if full:
        logger.warning("more than %d distinct unknown request fields seen; no more are logged",
                       MAX_WARNED_NAMES)
    return True


# read before the handler by the many-model router (api/server/model_set.py), on every route
ROUTER_FIELDS = frozenset({"keep_alive"})


def _refuse(name: str, status: FieldStatus) -> APIError:
    return APIError(400, f"{name} is not supported by this server: {status.note}", name)


def _neutral(value: Any, status: FieldStatus) -> bool:
    if value is None or value == {} or value == []:
        return True
    return any(type(value) is type(n) and value == n for n in status.neutral) or (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        and any(isinstance(n, (int, float)) and not isinstance(n, bool) and value == n
                for n in status.neutral))


def check_keys(struct: str, declared: frozenset[str], keys: Iterable[str],
               value_of: Callable[[str], Any], is_neutral: Callable[[Any, FieldStatus], bool]
               ) -> None:
    """The rule for the keys of one request of struct `struct` (see the module docstring)."""
    table = INVENTORY.get(struct)
    if table is None:
        return
    via_chat = struct in _PASSES_TO_CHAT
    chat_fields = _chat_fields() if via_chat else frozenset()
    not_forwarded = _not_forwarded() if via_chat else {}
    for name in keys:
        if name in declared or name in ROUTER_FIELDS:
            continue
        status = table.get(name)
        if status is None and via_chat:
            if name in chat_fields and name not in not_forwarded.get(struct, ()):
                continue  # handed to the chat path, which honours it
            status = CHAT.get(name)
        if status is None:
            warn_unknown(name, struct)
        elif status.status == REJECTED and not is_neutral(value_of(name), status):
            raise _refuse(name, status)


def check_json_fields(type_: type, body: bytes) -> None:
    """After `type_` decoded `body`: its top-level keys the struct does not declare."""
    name = type_.__name__
    if name not in INVENTORY:
        return
    declared = _declared.get(type_)
    if declared is None:
        declared = _declared[type_] = frozenset(getattr(type_, "__struct_fields__", ()))
    try:
        raw = _keys.decode(body)
    except msgspec.DecodeError:  # the struct decoded it, so this does not happen
        return
    if len(raw) <= len(declared) and raw.keys() <= declared:
        return
    check_keys(name, declared, raw.keys(), lambda k: _value(raw[k]), _neutral)


_UNREADABLE = object()  # a value the struct skipped unread that does not decode: never neutral


def _value(raw: msgspec.Raw) -> Any:
    """A key's value as JSON; an undeclared key's value is skipped unread by the struct's
    decode, so text in it may not be valid UTF-8 (then it is no neutral value: refused)."""
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return _UNREADABLE


def _form_neutral(text: Any, status: FieldStatus) -> bool:
    value = str(text).strip().lower()
    if value in ("", "null", "none", "{}", "[]"):
        return True
    for n in status.neutral:
        if isinstance(n, bool):
            if value in (("false", "0", "no", "off") if not n else ("true", "1", "yes", "on")):
                return True
        elif isinstance(n, (int, float)):
            try:
                if float(value) == n:
                    return True
            except ValueError:
                pass
        elif value == str(n).lower():
            return True
    return False


def check_form_fields(struct: str, declared: frozenset[str], names: Iterable[str],
                      text_of: Callable[[str], str]) -> None:
    """The same rule for a multipart form (the audio routes): its field names, and the text of
    one (read only for a refused field)."""
    check_keys(struct, declared, names, text_of, _form_neutral)
