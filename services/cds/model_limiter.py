"""Bound concurrent model calls and share them fairly between organizations.

Callers that find every slot taken wait in one queue per organization. A
freed slot goes to the waiting organization that has the fewest slots, and
among equals to the one whose last slot was granted longest ago. So an
organization that floods the service waits behind its own requests, while
any other organization gets one of the next slots that free up.
"""

import asyncio
import itertools
from collections import Counter, deque


class FairLimiter:
    """An asyncio semaphore with per-organization queues.

    Not thread-safe: every call must come from the event loop that runs the
    service.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self._active = 0
        self._active_by_org: Counter[str] = Counter()
        # Organization id -> its waiters, oldest first.
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}
        # Organization id -> sequence number of its last granted slot, kept
        # while the organization has or waits for a slot.
        self._last_grant: dict[str, int] = {}
        self._grant_numbers = itertools.count()

    @property
    def active(self) -> int:
        """Number of slots in use."""
        return self._active

    def waiting(self, org_id: str | None = None) -> int:
        """Return the number of waiters, of one organization or of all."""
        if org_id is not None:
            return len(self._queues.get(org_id, ()))

        return sum(len(queue) for queue in self._queues.values())

    async def acquire(self, org_id: str) -> None:
        """Wait for a slot for `org_id`; cancelling the wait is safe.

        Bound the wait with asyncio.timeout: a cancelled waiter leaves its
        queue, and a slot granted at the moment of cancellation is passed
        on to the next waiter.
        """
        if self._active < self.limit and not self._queues:
            self._take(org_id)
            return

        future = asyncio.get_running_loop().create_future()
        self._queues.setdefault(org_id, deque()).append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # The slot was granted just before the cancellation.
                self.release(org_id)
            else:
                self._forget(org_id, future)
            raise

    def release(self, org_id: str) -> None:
        """Return a slot taken for `org_id` and wake the next waiter."""
        if self._active_by_org[org_id] < 1:
            raise RuntimeError(
                f"release for organization {org_id!r} without a slot"
            )
        self._active -= 1
        self._active_by_org[org_id] -= 1
        if self._active_by_org[org_id] == 0:
            del self._active_by_org[org_id]
            self._drop_if_idle(org_id)
        self._grant_free_slots()

    def _take(self, org_id: str) -> None:
        self._active += 1
        self._active_by_org[org_id] += 1
        self._last_grant[org_id] = next(self._grant_numbers)

    def _forget(self, org_id: str, future: asyncio.Future[None]) -> None:
        queue = self._queues.get(org_id)
        if queue is not None and future in queue:
            queue.remove(future)
            if not queue:
                del self._queues[org_id]
        self._drop_if_idle(org_id)

    def _drop_if_idle(self, org_id: str) -> None:
        # An organization that neither has nor waits for a slot counts as
        # never served, so the bookkeeping stays bounded.
        if org_id not in self._active_by_org and org_id not in self._queues:
            self._last_grant.pop(org_id, None)

    def _priority(self, org_id: str) -> tuple[int, int]:
        return self._active_by_org[org_id], self._last_grant.get(org_id, -1)

    def _grant_free_slots(self) -> None:
        while self._active < self.limit and self._queues:
            org_id = min(self._queues, key=self._priority)
            queue = self._queues[org_id]
            future = queue.popleft()
            if not queue:
                del self._queues[org_id]
            if future.done():
                # Its task was cancelled and has not run its handler yet.
                continue
            self._take(org_id)
            future.set_result(None)
