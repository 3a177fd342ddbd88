"""The scheduler's waiting queue: FCFS deque or priority heap with O(1) removal (engine core).

Removal is lazy: a removed request stays in the deque/heap until it reaches the head (where it is
skipped) or until dead entries outnumber live ones (then the container is rebuilt once), so
aborting N waiting requests costs O(N) in total, never O(N) each.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Iterator

from fornax.runtime.scheduler.request import Request


class WaitingQueue:
    """Requests waiting for their first (or, after preemption, next) schedule, head first.

    `priority=False`: arrival order (FCFS), `push_front` for preempted requests. `priority=True`:
    ordered by `Request.sort_key()` (priority, then arrival), ties in insertion order.
    """

    def __init__(self, priority: bool = False, requests: Iterable[Request] = ()) -> None:
        self.priority = priority
        # entries carry a unique ticket: an entry is live while `_live` maps its id to it
        self._fifo: deque[tuple[int, Request]] = deque()
        self._heap: list[tuple[tuple[int, float], int, Request]] = []  # (key, ticket, request)
        self._tickets = itertools.count()
        self._front_tickets = itertools.count(-1, -1)  # heap entries pushed to the front
        self._live: dict[str, tuple[int, Request]] = {}  # request id -> (ticket, request)
        self._num_dead = 0
        self.num_prompt_tokens = 0  # prompt tokens of the live entries (admission by tokens)
        for request in requests:
            self.push(request)

    # ---- size ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._live)

    def __bool__(self) -> bool:
        return bool(self._live)

    def __contains__(self, request: object) -> bool:
        if not isinstance(request, Request):
            return False
        entry = self._live.get(request.request_id)
        return entry is not None and entry[1] is request

    def __iter__(self) -> Iterator[Request]:
        """The live requests, head first (O(N log N) for the heap: for inspection, not the loop)."""
        if self.priority:
            entries = sorted(self._heap, key=lambda e: (e[0], e[1]))
            return iter([r for _, t, r in entries if self._is_live(t, r)])
        return iter([r for t, r in self._fifo if self._is_live(t, r)])

    # ---- add -----------------------------------------------------------------------------------
    def push(self, request: Request) -> None:
        self._push(request, front=False)

    def push_front(self, request: Request) -> None:
        """A preempted request: FCFS puts it at the head; priority order keeps its key's place."""
        self._push(request, front=True)

    def _push(self, request: Request, front: bool) -> None:
        if request.request_id in self._live:
            raise ValueError(f"request {request.request_id!r} is already waiting")
        ticket = next(self._front_tickets if front else self._tickets)
        self._live[request.request_id] = (ticket, request)
        self.num_prompt_tokens += request.num_prompt_tokens
        if self.priority:
            heapq.heappush(self._heap, (request.sort_key(), ticket, request))
        elif front:
            self._fifo.appendleft((ticket, request))
        else:
            self._fifo.append((ticket, request))

    # ---- head ----------------------------------------------------------------------------------
    def peek(self) -> Request:
        """The head request (IndexError when empty)."""
        self._drop_dead_head()
        if self.priority:
            if not self._heap:
                raise IndexError("peek from an empty waiting queue")
            return self._heap[0][2]
        if not self._fifo:
            raise IndexError("peek from an empty waiting queue")
        return self._fifo[0][1]

    def popleft(self) -> Request:
        request = self.peek()
        if self.priority:
            heapq.heappop(self._heap)
        else:
            self._fifo.popleft()
        self._untrack(request)
        return request

    # list-like spelling used by the scheduler's loop (`waiting[0]`, `waiting.pop(0)`)
    def __getitem__(self, index: int) -> Request:
        if index != 0:
            raise IndexError("only the head of the waiting queue can be indexed")
        return self.peek()

    def pop(self, index: int = 0) -> Request:
        if index != 0:
            raise IndexError("only the head of the waiting queue can be popped")
        return self.popleft()

    # ---- removal -------------------------------------------------------------------------------
    def remove(self, request: Request) -> bool:
        """Take `request` out in O(1) (amortized); False when it is not waiting."""
        if request not in self:
            return False
        self._untrack(request)
        self._num_dead += 1
        if self._num_dead > 64 and self._num_dead > len(self._live):
            self._compact()
        return True

    def _untrack(self, request: Request) -> None:
        del self._live[request.request_id]
        self.num_prompt_tokens -= request.num_prompt_tokens

    def _is_live(self, ticket: int, request: Request) -> bool:
        entry = self._live.get(request.request_id)
        return entry is not None and entry[0] == ticket

    def _drop_dead_head(self) -> None:
        if self.priority:
            while self._heap and not self._is_live(self._heap[0][1], self._heap[0][2]):
                heapq.heappop(self._heap)
                self._num_dead -= 1
        else:
            while self._fifo and not self._is_live(*self._fifo[0]):
                self._fifo.popleft()
                self._num_dead -= 1

    def _compact(self) -> None:
        """Drop every dead entry at once: O(N), paid for by the > N removals before it."""
        if self.priority:
            self._heap = [e for e in self._heap if self._is_live(e[1], e[2])]
            heapq.heapify(self._heap)
        else:
            self._fifo = deque(e for e in self._fifo if self._is_live(*e))
        self._num_dead = 0
