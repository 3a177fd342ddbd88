"""Where /v1/responses keeps stored responses: a bounded in-memory store (per API worker) or a
SQLite file shared by the workers and kept across restarts (API workers).

`--responses-store memory` (default) keeps at most `--responses-store-max-count` responses for at
most `--responses-store-max-age` seconds in each worker's memory: with several API workers a
response is found only by the worker that made it. `--responses-store sqlite:PATH` keeps them in
one SQLite file (WAL mode) that every worker reads and writes, so any worker answers GET, cancel
and previous_response_id, and stored responses survive a restart.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgspec

logger = logging.getLogger(__name__)

CANCELLABLE = frozenset({"queued", "in_progress"})


class StoredResponse(msgspec.Struct):
    """A response object, and the chat conversation it ends (for previous_response_id)."""

    response: dict[str, Any]
    messages: list[dict[str, Any]] = []
    created: float = 0.0
    input_items: list[dict[str, Any]] = []  # this request's input, with ids (input_items route)

    @property
    def status(self) -> str:
        return str(self.response.get("status", ""))


class ResponseStore(ABC):
    """The store interface; `shared` says whether every API worker sees the same entries."""

    shared = False

    def __init__(self, max_count: int, max_age_s: float) -> None:
        self.max_count = max(1, max_count)
        self.max_age_s = max_age_s

    def expired(self, record: StoredResponse, now: float | None = None) -> bool:
        return (now or time.time()) - record.created > self.max_age_s

    @abstractmethod
    async def put(self, rid: str, record: StoredResponse) -> bool:
        """Write a response; a cancelled one is never overwritten by another status (False)."""

    @abstractmethod
    async def get(self, rid: str) -> StoredResponse | None: ...

    @abstractmethod
    async def delete(self, rid: str) -> bool: ...

    @abstractmethod
    async def cancel(self, rid: str) -> StoredResponse | None:
        """Mark a queued or running response cancelled; returns the record (None: unknown)."""

    def close(self) -> None:
        return None


def _cancelled(record: StoredResponse) -> StoredResponse:
    response = dict(record.response, status="cancelled")
    return StoredResponse(response, record.messages, record.created, record.input_items)


class MemoryResponseStore(ResponseStore):
    """Bounded by count and age; the oldest responses go first. One per API worker."""

    def __init__(self, max_count: int, max_age_s: float) -> None:
        super().__init__(max_count, max_age_s)
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def _prune(self) -> None:
        now = time.time()
        while self._items:
            rid, oldest = next(iter(self._items.items()))
            if len(self._items) <= self.max_count and not self.expired(oldest, now):
                break
            del self._items[rid]

    async def put(self, rid: str, record: StoredResponse) -> bool:
        held = self._items.get(rid)
        if held is not None and held.status == "cancelled" and record.status != "cancelled":
            return False
        self._items[rid] = record
        self._prune()
        return True

    async def get(self, rid: str) -> StoredResponse | None:
        record = self._items.get(rid)
        return None if record is None or self.expired(record) else record

    async def delete(self, rid: str) -> bool:
        return self._items.pop(rid, None) is not None

    async def cancel(self, rid: str) -> StoredResponse | None:
        record = await self.get(rid)
        if record is not None and record.status in CANCELLABLE:
            record = self._items[rid] = _cancelled(record)
        return record


_SCHEMA = ("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, created REAL NOT NULL, "
           "status TEXT NOT NULL, record BLOB NOT NULL)")
_PRUNE_EVERY_S = 30.0


class SQLiteResponseStore(ResponseStore):
    """One SQLite file shared by every API worker; survives restarts."""

    shared = True

    def __init__(self, path: str, max_count: int, max_age_s: float) -> None:
        super().__init__(max_count, max_age_s)
        self.path = path
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(Path(path).expanduser()), timeout=30.0,
                                   check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(StoredResponse)
        self._last_prune = 0.0
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute(_SCHEMA)
            self._db.execute("CREATE INDEX IF NOT EXISTS responses_created ON responses(created)")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            return fn(*args)

    def _load(self, rid: str) -> StoredResponse | None:
        row = self._db.execute("SELECT record FROM responses WHERE id = ?", (rid,)).fetchone()
        return None if row is None else self._decoder.decode(row[0])

    def _write(self, rid: str, record: StoredResponse) -> None:
        self._db.execute("INSERT OR REPLACE INTO responses (id, created, status, record) "
                         "VALUES (?, ?, ?, ?)",
                         (rid, record.created, record.status, self._encoder.encode(record)))

    def _put(self, rid: str, record: StoredResponse) -> bool:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT status FROM responses WHERE id = ?", (rid,)).fetchone()
            if row is not None and row[0] == "cancelled" and record.status != "cancelled":
                return False
            self._write(rid, record)
            return True
        finally:
            self._db.execute("COMMIT")
            self._prune()

    def _prune(self) -> None:
        now = time.time()
        if now - self._last_prune < _PRUNE_EVERY_S:
            return
        self._last_prune = now
        self._db.execute("DELETE FROM responses WHERE created < ?", (now - self.max_age_s,))
        self._db.execute("DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY "
                         "created DESC LIMIT -1 OFFSET ?)", (self.max_count,))

    def _cancel(self, rid: str) -> StoredResponse | None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            record = self._load(rid)
            if record is not None and record.status in CANCELLABLE:
                record = _cancelled(record)
                self._write(rid, record)
            return record
        finally:
            self._db.execute("COMMIT")

    async def put(self, rid: str, record: StoredResponse) -> bool:
        return bool(await self._run(self._put, rid, record))

    async def get(self, rid: str) -> StoredResponse | None:
        record = await self._run(self._load, rid)
        return None if record is None or self.expired(record) else record

    async def delete(self, rid: str) -> bool:
        def delete() -> bool:
            return self._db.execute("DELETE FROM responses WHERE id = ?", (rid,)).rowcount > 0

        return bool(await self._run(delete))

    async def cancel(self, rid: str) -> StoredResponse | None:
        record = await self._run(self._cancel, rid)
        return None if record is None or self.expired(record) else record

    def close(self) -> None:
        with self._lock:
            self._db.close()


def make_store(spec: str, max_count: int, max_age_s: float) -> ResponseStore:
    """`memory` or `sqlite:PATH` (--responses-store)."""
    if spec.startswith("sqlite:"):
        store: ResponseStore = SQLiteResponseStore(spec[len("sqlite:"):], max_count, max_age_s)
        logger.info("responses store: SQLite at %s", spec[len("sqlite:"):])
        return store
    if spec != "memory":
        raise ValueError(f"unknown responses store {spec!r} (memory or sqlite:PATH)")
    return MemoryResponseStore(max_count, max_age_s)
