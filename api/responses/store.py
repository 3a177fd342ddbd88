"""Where /v1/responses keeps stored responses: a bounded in-memory store (per API worker) or a
SQLite file shared by the workers and kept across restarts (API workers).

`--responses-store memory` (default) keeps at most `--responses-store-max-count` responses and
`--responses-store-max-bytes` bytes (JSON-encoded) for at most `--responses-store-max-age` seconds
in each worker's memory, the oldest going first: with several API workers a response is found only
by the worker that made it. `--responses-store sqlite:PATH` keeps them in one SQLite file (WAL
mode) that every worker reads and writes, so any worker answers GET, cancel and
previous_response_id, and stored responses survive a restart; its count and byte caps are applied
every 1% of either cap written (or every 30 s), so the file may briefly hold about 1% more.

A record is refused beyond `--responses-store-max-record-bytes` (RecordTooLarge). Every record
carries its owner: a hash of the API key that made it ('' without API keys; raw keys are never
stored). A lookup with another owner finds nothing, as if the record did not exist.
"""

from __future__ import annotations

import asyncio
import hashlib
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
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_RECORD_BYTES = 16 * 1024 * 1024


class RecordTooLarge(Exception):
    """A record whose JSON is larger than the per-record cap; it is not stored."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the stored response would take {size} bytes, more than the limit of "
                         f"{limit} bytes (--responses-store-max-record-bytes)")
        self.size = size
        self.limit = limit


def owner_of(api_key: str | None) -> str:
    """The owner tag of the records an API key makes: a hash, never the key ('' for no key)."""
    if not api_key:
        return ""
    data = b"fornax-responses-owner\0" + api_key.encode("utf-8", "surrogateescape")
    return hashlib.sha256(data).hexdigest()[:32]


class StoredResponse(msgspec.Struct):
    """A response object, and the chat conversation it ends (for previous_response_id)."""

    response: dict[str, Any]
    messages: list[dict[str, Any]] = []
    created: float = 0.0
    input_items: list[dict[str, Any]] = []  # this request's input, with ids (input_items route)
    owner: str = ""  # owner_of(the API key that made it)

    @property
    def status(self) -> str:
        return str(self.response.get("status", ""))


class ResponseStore(ABC):
    """The store interface; `shared` says whether every API worker sees the same entries."""

    shared = False

    def __init__(self, max_count: int, max_age_s: float, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        self.max_count = max(1, max_count)
        self.max_age_s = max_age_s
        self.max_bytes = max(1, max_bytes)
        self.max_record_bytes = max(1, min(max_record_bytes, self.max_bytes))
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(StoredResponse)

    def expired(self, record: StoredResponse, now: float | None = None) -> bool:
        return (now or time.time()) - record.created > self.max_age_s

    def encode(self, record: StoredResponse) -> bytes:
        """The record's JSON; RecordTooLarge beyond --responses-store-max-record-bytes."""
        data = self._encoder.encode(record)
        if len(data) > self.max_record_bytes:
            raise RecordTooLarge(len(data), self.max_record_bytes)
        return data

    @abstractmethod
    async def put(self, rid: str, record: StoredResponse) -> bool:
        """Write a response (RecordTooLarge beyond the cap); False when it was cancelled meanwhile
        (a cancelled one is never overwritten by another status) or another owner holds `rid`."""

    @abstractmethod
    async def get(self, rid: str, owner: str = "") -> StoredResponse | None:
        """The record, when `owner` made it (None otherwise, as for an unknown id)."""

    @abstractmethod
    async def delete(self, rid: str, owner: str = "") -> bool: ...

    @abstractmethod
    async def cancel(self, rid: str, owner: str = "") -> StoredResponse | None:
        """Mark a queued or running response cancelled; returns the record (None: unknown)."""

    def close(self) -> None:
        return None


def _cancelled(record: StoredResponse) -> StoredResponse:
    response = dict(record.response, status="cancelled")
    return StoredResponse(response, record.messages, record.created, record.input_items,
                          record.owner)


class MemoryResponseStore(ResponseStore):
    """Bounded by count, bytes and age; the oldest responses go first. One per API worker.
    Records are kept JSON-encoded, so the byte cap counts what they really hold."""

    def __init__(self, max_count: int, max_age_s: float, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        super().__init__(max_count, max_age_s, max_bytes, max_record_bytes)
        self._items: OrderedDict[str, tuple[float, str, str, bytes]] = OrderedDict()
        self.bytes = 0  # the JSON bytes held

    def _prune(self) -> None:
        now = time.time()
        while self._items:
            rid, (created, _, _, data) = next(iter(self._items.items()))
            if len(self._items) <= self.max_count and self.bytes <= self.max_bytes and \
                    now - created <= self.max_age_s:
                break
            del self._items[rid]
            self.bytes -= len(data)

    def _held(self, rid: str, owner: str) -> StoredResponse | None:
        held = self._items.get(rid)
        if held is None or held[1] != owner or time.time() - held[0] > self.max_age_s:
            return None
        return self._decoder.decode(held[3])

    async def put(self, rid: str, record: StoredResponse) -> bool:
        data = self.encode(record)
        held = self._items.get(rid)
        if held is not None:
            if held[1] != record.owner or (held[2] == "cancelled" and
                                           record.status != "cancelled"):
                return False
            self.bytes -= len(held[3])
        self._items[rid] = (record.created, record.owner, record.status, data)
        self.bytes += len(data)
        self._prune()
        return True

    async def get(self, rid: str, owner: str = "") -> StoredResponse | None:
        return self._held(rid, owner)

    async def delete(self, rid: str, owner: str = "") -> bool:
        held = self._items.get(rid)
        if held is None or held[1] != owner:
            return False
        del self._items[rid]
        self.bytes -= len(held[3])
        return True

    def stats(self) -> tuple[int, int]:
        """(records, bytes) held now (tests and diagnostics)."""
        return len(self._items), self.bytes

    async def cancel(self, rid: str, owner: str = "") -> StoredResponse | None:
        record = self._held(rid, owner)
        if record is not None and record.status in CANCELLABLE:
            record = _cancelled(record)
            await self.put(rid, record)
        return record


_SCHEMA = ("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, created REAL NOT NULL, "
           "status TEXT NOT NULL, record BLOB NOT NULL, owner TEXT NOT NULL DEFAULT '', "
           "size INTEGER NOT NULL DEFAULT 0)")
_PRUNE_EVERY_S = 30.0
_PRUNE_EVERY_SHARE = 100  # prune after 1% of the count or byte cap was written


class SQLiteResponseStore(ResponseStore):
    """One SQLite file shared by every API worker; survives restarts."""

    shared = True

    def __init__(self, path: str, max_count: int, max_age_s: float,
                 max_bytes: int = DEFAULT_MAX_BYTES,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        super().__init__(max_count, max_age_s, max_bytes, max_record_bytes)
        self.path = path
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(Path(path).expanduser()), timeout=30.0,
                                   check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._last_prune = 0.0
        self._written_rows = 0  # since the last prune
        self._written_bytes = 0
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute("BEGIN IMMEDIATE")  # several workers open the file at once
            try:
                self._db.execute(_SCHEMA)
                columns = {row[1] for row in self._db.execute("PRAGMA table_info(responses)")}
                for column, kind in (("owner", "TEXT NOT NULL DEFAULT ''"),
                                     ("size", "INTEGER NOT NULL DEFAULT 0")):
                    if column not in columns:  # a file from before owners and sizes
                        self._db.execute(f"ALTER TABLE responses ADD COLUMN {column} {kind}")
                self._db.execute("CREATE INDEX IF NOT EXISTS responses_created "
                                 "ON responses(created)")
            finally:
                self._db.execute("COMMIT")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            return fn(*args)

    def _load(self, rid: str, owner: str) -> StoredResponse | None:
        row = self._db.execute("SELECT record FROM responses WHERE id = ? AND owner = ?",
                               (rid, owner)).fetchone()
        return None if row is None else self._decoder.decode(row[0])

    def _write(self, rid: str, record: StoredResponse, data: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO responses (id, created, status, record, owner, "
                         "size) VALUES (?, ?, ?, ?, ?, ?)",
                         (rid, record.created, record.status, data, record.owner, len(data)))
        self._written_rows += 1
        self._written_bytes += len(data)

    def _put(self, rid: str, record: StoredResponse, data: bytes) -> bool:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT status, owner FROM responses WHERE id = ?",
                                   (rid,)).fetchone()
            if row is not None and (row[1] != record.owner or
                                    (row[0] == "cancelled" and record.status != "cancelled")):
                return False
            self._write(rid, record, data)
            return True
        finally:
            self._db.execute("COMMIT")
            self._prune()

    def _prune(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_prune < _PRUNE_EVERY_S and \
                self._written_rows * _PRUNE_EVERY_SHARE < self.max_count and \
                self._written_bytes * _PRUNE_EVERY_SHARE < self.max_bytes:
            return
        self._last_prune = now
        self._written_rows = self._written_bytes = 0
        self._db.execute("DELETE FROM responses WHERE created < ?", (now - self.max_age_s,))
        self._db.execute("DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY "
                         "created DESC LIMIT -1 OFFSET ?)", (self.max_count,))
        self._db.execute("DELETE FROM responses WHERE id IN (SELECT id FROM (SELECT id, SUM(size) "
                         "OVER (ORDER BY created DESC, id) AS kept FROM responses) WHERE kept > ?)",
                         (self.max_bytes,))

    def _cancel(self, rid: str, owner: str) -> StoredResponse | None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            record = self._load(rid, owner)
            if record is not None and record.status in CANCELLABLE:
                record = _cancelled(record)
                self._write(rid, record, self._encoder.encode(record))
            return record
        finally:
            self._db.execute("COMMIT")

    async def put(self, rid: str, record: StoredResponse) -> bool:
        data = self.encode(record)  # RecordTooLarge before touching the file
        return bool(await self._run(self._put, rid, record, data))

    async def get(self, rid: str, owner: str = "") -> StoredResponse | None:
        record = await self._run(self._load, rid, owner)
        return None if record is None or self.expired(record) else record

    async def delete(self, rid: str, owner: str = "") -> bool:
        def delete() -> bool:
            return self._db.execute("DELETE FROM responses WHERE id = ? AND owner = ?",
                                    (rid, owner)).rowcount > 0

        return bool(await self._run(delete))

    async def cancel(self, rid: str, owner: str = "") -> StoredResponse | None:
        record = await self._run(self._cancel, rid, owner)
        return None if record is None or self.expired(record) else record

    def stats(self) -> tuple[int, int]:
        """(rows, bytes) in the file now (tests and diagnostics)."""
        with self._lock:
            rows, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) "
                                          "FROM responses").fetchone()
        return int(rows), int(size)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def make_store(spec: str, max_count: int, max_age_s: float, max_bytes: int = DEFAULT_MAX_BYTES,
               max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> ResponseStore:
    """`memory` or `sqlite:PATH` (--responses-store)."""
    if spec.startswith("sqlite:"):
        store: ResponseStore = SQLiteResponseStore(spec[len("sqlite:"):], max_count, max_age_s,
                                                   max_bytes, max_record_bytes)
        logger.info("responses store: SQLite at %s", spec[len("sqlite:"):])
        return store
    if spec != "memory":
        raise ValueError(f"unknown responses store {spec!r} (memory or sqlite:PATH)")
    return MemoryResponseStore(max_count, max_age_s, max_bytes, max_record_bytes)
