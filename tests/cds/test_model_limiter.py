"""The fair limiter of concurrent model calls."""

import asyncio

import pytest

from services.cds.model_limiter import FairLimiter


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(5):
        await asyncio.sleep(0)


class Caller:
    """A task that takes a slot for one organization and keeps it."""

    def __init__(self, limiter: FairLimiter, org_id: str, log: list) -> None:
        self.org_id = org_id
        self.acquired = asyncio.Event()
        self.done = asyncio.Event()
        self._limiter = limiter
        self._log = log
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        await self._limiter.acquire(self.org_id)
        self._log.append(self.org_id)
        self.acquired.set()
        try:
            await self.done.wait()
        finally:
            self._limiter.release(self.org_id)


class TestFairLimiter:
    def test_limit_below_one_rejected(self):
        """A limit of 0 is a configuration error."""
        with pytest.raises(ValueError, match="at least 1"):
            FairLimiter(0)

    def test_bounds_concurrent_slots(self):
        """No more than `limit` callers hold a slot at once."""

        async def scenario():
            limiter = FairLimiter(2)
            started: list[str] = []
            callers = [Caller(limiter, "a", started) for _ in range(5)]
            await settle()

            assert ["a", "a"] == started
            assert 2 == limiter.active
            assert 3 == limiter.waiting("a")

            callers[0].done.set()
            await settle()

            assert 3 == len(started)
            assert 2 == limiter.active
            for caller in callers:
                caller.done.set()
            await asyncio.gather(*(c.task for c in callers))
            assert 0 == limiter.active
            assert 0 == limiter.waiting()

        asyncio.run(scenario())

    def test_flooding_org_cannot_starve_other(self):
        """A second org gets the next free slot despite a flood."""

        async def scenario():
            limiter = FairLimiter(2)
            order: list[str] = []
            flood = [Caller(limiter, "flood", order) for _ in range(10)]
            await settle()
            other = Caller(limiter, "other", order)
            await settle()

            assert ["flood", "flood"] == order

            flood[0].done.set()
            await settle()

            assert "other" == order[-1]
            other.done.set()
            for caller in flood:
                caller.done.set()
            await asyncio.gather(other.task, *(c.task for c in flood))

        asyncio.run(scenario())

    def test_slots_alternate_between_waiting_orgs(self):
        """With one slot, two queued orgs are served in turn."""

        async def scenario():
            limiter = FairLimiter(1)
            order: list[str] = []
            callers = [Caller(limiter, "a", order)]
            await settle()
            callers += [Caller(limiter, "a", order) for _ in range(3)]
            callers += [Caller(limiter, "b", order) for _ in range(3)]
            await settle()

            for _ in callers:
                # The holder is the one running caller that is not done.
                holders = [
                    c
                    for c in callers
                    if c.acquired.is_set() and not c.done.is_set()
                ]
                assert 1 == len(holders)
                holders[0].done.set()
                await settle()
            await asyncio.gather(*(c.task for c in callers))

            assert ["a", "b", "a", "b", "a", "b", "a"] == order

        asyncio.run(scenario())

    def test_org_with_fewer_slots_goes_first(self):
        """A freed slot goes to the waiting org holding the fewest."""

        async def scenario():
            limiter = FairLimiter(4)
            order: list[str] = []
            a_callers = [Caller(limiter, "a", order) for _ in range(3)]
            await settle()
            b_holder = Caller(limiter, "b", order)
            await settle()
            a_callers.append(Caller(limiter, "a", order))
            b_waiter = Caller(limiter, "b", order)
            await settle()

            # After this release "a" holds 2 slots and "b" holds 1, so "b"
            # goes first although "a" queued earlier and got its last slot
            # before "b" did.
            a_callers[0].done.set()
            await settle()

            assert "b" == order[-1]
            for caller in (*a_callers, b_holder, b_waiter):
                caller.done.set()
            await asyncio.gather(
                b_holder.task, b_waiter.task, *(c.task for c in a_callers)
            )

        asyncio.run(scenario())

    def test_timed_out_waiter_leaves_queue(self):
        """A wait cut off by asyncio.timeout frees its place."""

        async def scenario():
            limiter = FairLimiter(1)
            order: list[str] = []
            holder = Caller(limiter, "a", order)
            await settle()

            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.01):
                    await limiter.acquire("b")

            assert 0 == limiter.waiting()
            holder.done.set()
            await holder.task
            assert 0 == limiter.active
            await limiter.acquire("b")
            assert 1 == limiter.active
            limiter.release("b")

        asyncio.run(scenario())

    def test_cancel_after_grant_passes_slot_on(self):
        """A slot granted to a waiter cancelled in the same step moves on."""

        async def scenario():
            limiter = FairLimiter(1)
            order: list[str] = []
            holder = Caller(limiter, "a", order)
            await settle()
            cancelled = asyncio.create_task(limiter.acquire("b"))
            next_caller = Caller(limiter, "c", order)
            await settle()

            # One loop step runs the holder's release, which grants the
            # slot to "b". Its task is cancelled before it runs again.
            holder.done.set()
            await asyncio.sleep(0)
            assert not cancelled.done()
            assert 1 == limiter.waiting()
            cancelled.cancel()
            await settle()

            assert cancelled.cancelled()
            assert ["a", "c"] == order
            assert 1 == limiter.active
            next_caller.done.set()
            await next_caller.task
            assert 0 == limiter.active
            assert 0 == limiter.waiting()

        asyncio.run(scenario())

    def test_release_without_slot_raises(self):
        """Releasing a slot an org does not hold is a bug, not a no-op."""
        limiter = FairLimiter(1)

        with pytest.raises(RuntimeError, match="without a slot"):
            limiter.release("a")
