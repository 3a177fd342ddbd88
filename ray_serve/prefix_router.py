"""Ray Serve request router that sends a prompt to the replica holding its prefix in the KV cache
(`request_router: prefix`); runs wherever the deployment's handle lives (the ingress replica)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import msgspec
from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from fornax.ray_serve.prefix_index import PrefixAffinityPolicy, PrefixPolicyConfig

logger = logging.getLogger(__name__)

_MAX_JSON_BODY = 8 << 20  # a raw JSON body larger than this is not decoded here: default routing
_MAX_PENDING = 4096  # requests chosen for but not yet reported routed or completed
_BODY_KEYS = ("messages", "prompt", "input")
_MAX_ARGS = 8  # positional arguments looked at for the body


def request_body(pending_request: PendingRequest | None) -> Mapping[str, Any] | None:
    """The OpenAI-style body among a pending request's arguments: the `body=` keyword or one of
    the first positional arguments (`ModelReplica.forward(method, path, query, headers, body)`
    passes the raw JSON bytes last), as a mapping or raw JSON bytes/str. None for any other
    shape (the policy then routes by load alone); never raises."""
    if pending_request is None:
        return None
    try:
        kwargs = pending_request.kwargs if isinstance(pending_request.kwargs, Mapping) else {}
        args = list(pending_request.args or ())[:_MAX_ARGS]
        for value in [kwargs.get("body"), *args]:
            if isinstance(value, (bytes, bytearray, memoryview, str)):
                if len(value) > _MAX_JSON_BODY or not _looks_like_object(value):
                    continue
                value = msgspec.json.decode(value)
            if isinstance(value, Mapping) and any(k in value for k in _BODY_KEYS):
                return value
    except Exception:  # a body this router cannot read is routed by load, never failed
        logger.debug("prefix router: unreadable request arguments", exc_info=True)
    return None


def _looks_like_object(value: bytes | bytearray | memoryview | str) -> bool:
    head = bytes(value[:64]) if not isinstance(value, str) else value[:64].encode()
    return head.lstrip()[:1] == b"{"


class PrefixAffinityRouter(RequestRouter):
    """Longest cached prefix first, least-loaded when that replica is too busy (see
    `fornax.ray_serve.prefix_index`). Queue lengths come from Serve's queue-length cache, else
    from this router's own count of requests it sent and that have not completed. The index is
    this router's alone: each process holding a handle (one per ingress replica) learns its own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._policy = PrefixAffinityPolicy()
        self._inflight: dict[str, int] = {}
        self._pending: OrderedDict[str, list[bytes]] = OrderedDict()

    def initialize_state(self, **kwargs: Any) -> None:
        """Serve calls this with the deployment's `request_router_kwargs`."""
        try:
            config = PrefixPolicyConfig.from_kwargs(kwargs)
        except ValueError as e:  # the YAML loader checks these first; here: defaults, loudly
            logger.error("prefix router: %s; using the defaults", e)
            config = PrefixPolicyConfig()
        self._policy = PrefixAffinityPolicy(config)

    @property
    def policy(self) -> PrefixAffinityPolicy:
        return self._policy

    def _load(self, replica: RunningReplica, key: str) -> int:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        return cached if cached is not None else self._inflight.get(key, 0)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """The chosen replica as the first rank, every other candidate as the second (Serve
        takes the least-loaded replica that accepts from the first rank that has one)."""
        if not candidate_replicas:
            return []
        policy = self.policy
        by_key = {r.replica_id.to_full_id_str(): r for r in candidate_replicas}
        try:
            loads = {key: self._load(r, key) for key, r in by_key.items()}
            choice = policy.choose(request_body(pending_request), loads)
        except Exception:
            logger.exception("prefix router: choice failed; routing by load")
            choice = None
        if choice is None:
            return [list(candidate_replicas)]
        if pending_request is not None and choice.hashes:
            self._remember(pending_request.metadata.internal_request_id, choice.hashes)
        first = by_key[choice.replica]
        rest = [r for r in candidate_replicas if r is not first]
        return [[first], rest] if rest else [[first]]

    def _remember(self, request_id: str, hashes: list[bytes]) -> None:
        self._pending[request_id] = hashes
        self._pending.move_to_end(request_id)
        while len(self._pending) > _MAX_PENDING:
            self._pending.popitem(last=False)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        """The replica that accepted the request now holds its prefix (it may differ from the
        first choice when that one refused)."""
        try:
            hashes = self._pending.pop(pending_request.metadata.internal_request_id, None)
            if hashes:
                self.policy.record(hashes, replica_id.to_full_id_str())
        except Exception:
            logger.debug("prefix router: could not record a routed request", exc_info=True)

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        key = replica_id.to_full_id_str()
        self._inflight[key] = self._inflight.get(key, 0) + 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        self._pending.pop(internal_request_id, None)
        key = replica_id.to_full_id_str()
        left = self._inflight.get(key, 0) - 1
        if left > 0:
            self._inflight[key] = left
        else:
            self._inflight.pop(key, None)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        keys = {r.replica_id.to_full_id_str() for r in replicas}
        self.policy.retain(keys)
        for gone in [k for k in self._inflight if k not in keys]:
            del self._inflight[gone]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        key = replica_id.to_full_id_str()
        self.policy.remove_replica(key)
        self._inflight.pop(key, None)
