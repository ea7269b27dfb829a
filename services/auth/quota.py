"""Daily request quotas, counted in PostgreSQL in batches.

Every request of a known key adds one to its organization's row of
`auth.daily_usage` for the UTC day, unless the row is at the plan's limit.
One auth replica sends one statement per organization for all the requests
that arrived while its previous statement ran, so under load the database
receives a few statements instead of one per request. The statement adds
`least(wanted, limit - count)` in a single row update, and PostgreSQL
serializes such updates on the row lock. So replicas racing for the last
units never let through more than the limit, and the stored count equals
the number of requests let through.
"""

import asyncio
import datetime
from collections import defaultdict
from dataclasses import dataclass

import psycopg
import structlog

log = structlog.get_logger()

# Stands for "unlimited": no organization reaches it in a day.
NO_LIMIT = 2**62
# Seconds one batch may take before its requests fail as unavailable. It
# is below Envoy's 2 s ext_authz timeout, so the client gets the auth
# service's own 503 rather than Envoy's.
BATCH_TIMEOUT_SECONDS = 1.5

# `last_grant` records how many of `wanted` the same update added, because
# RETURNING shows only the new row and the old count is needed to number
# the requests of a batch.
_COUNT_STATEMENT = """
INSERT INTO auth.daily_usage AS usage
    (org_id, day, request_count, last_grant)
VALUES (%(org_id)s, %(day)s, least(%(wanted)s, %(limit)s),
        least(%(wanted)s, %(limit)s))
ON CONFLICT (org_id, day) DO UPDATE
SET request_count = usage.request_count
        + least(%(wanted)s, %(limit)s - usage.request_count),
    last_grant = least(%(wanted)s, %(limit)s - usage.request_count)
WHERE usage.request_count < %(limit)s
RETURNING request_count, last_grant
"""


class QuotaUnavailable(Exception):
    """The quota could not be counted: the database failed or was slow."""


@dataclass(frozen=True)
class _Bucket:
    org_id: str
    day: datetime.date
    limit: int


class QuotaCounter:
    """Count requests against daily limits over one database connection."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._connection: psycopg.AsyncConnection | None = None
        self._waiting: dict[_Bucket, list[asyncio.Future]] = defaultdict(list)
        self._flusher: asyncio.Task | None = None

    async def count(
        self, org_id: str, day: datetime.date, limit: int | None
    ) -> int | None:
        """Count one request and return the day's new count, or None at
        the limit.

        A request at the limit is not counted. Raises QuotaUnavailable when
        the database cannot be reached or does not respond in time.
        """
        bucket = _Bucket(org_id, day, NO_LIMIT if limit is None else limit)
        future = asyncio.get_running_loop().create_future()
        self._waiting[bucket].append(future)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

        return await future

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def _flush(self) -> None:
        """Send batches until no request waits."""
        while self._waiting:
            batch, self._waiting = self._waiting, defaultdict(list)
            try:
                async with asyncio.timeout(BATCH_TIMEOUT_SECONDS):
                    results = await self._send_retrying(batch)
            except (psycopg.Error, OSError, TimeoutError) as error:
                log.error(
                    "auth.quota_unavailable",
                    error=type(error).__name__,
                    requests=sum(len(futures) for futures in batch.values()),
                )
                await self._reset()
                for futures in batch.values():
                    _fail(futures, error)
                continue
            for bucket, futures in batch.items():
                _settle(futures, *results[bucket])

    async def _send_retrying(
        self, batch: dict[_Bucket, list[asyncio.Future]]
    ) -> dict[_Bucket, tuple[int, int]]:
        """Send a batch, retrying once on a connection kept from before.

        A kept connection is dead after PostgreSQL restarts, and the batch
        then fails before any statement runs, so a fresh connection gets
        it through. If instead the connection broke while an update ran,
        the retry can count that batch twice: the organization loses a few
        requests of its quota, and none beyond the limit gets through.
        """
        if self._connection is not None and not self._connection.closed:
            try:
                return await self._send(batch)
            except psycopg.OperationalError as error:
                log.warning(
                    "auth.quota_reconnecting", error=type(error).__name__
                )
                await self._reset()
        self._connection = await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, connect_timeout=5
        )

        return await self._send(batch)

    async def _send(
        self, batch: dict[_Bucket, list[asyncio.Future]]
    ) -> dict[_Bucket, tuple[int, int]]:
        """Return the new count and the units granted for each bucket."""
        if len(batch) == 1:
            # The usual case under load: one organization's requests.
            ((bucket, futures),) = batch.items()
            cursor = await self._execute(bucket, len(futures))
            return {bucket: _granted(bucket, await cursor.fetchone())}
        async with self._connection.pipeline():
            cursors = {
                bucket: await self._execute(bucket, len(futures))
                for bucket, futures in batch.items()
            }
        results = {}
        for bucket, cursor in cursors.items():
            results[bucket] = _granted(bucket, await cursor.fetchone())

        return results

    async def _execute(
        self, bucket: _Bucket, wanted: int
    ) -> psycopg.AsyncCursor:
        return await self._connection.execute(
            _COUNT_STATEMENT,
            {
                "org_id": bucket.org_id,
                "day": bucket.day,
                "wanted": wanted,
                "limit": bucket.limit,
            },
            prepare=True,
        )

    async def _reset(self) -> None:
        if self._connection is not None:
            try:
                await self._connection.close()
            except (psycopg.Error, OSError):
                pass
        self._connection = None


def _granted(bucket: _Bucket, row: tuple | None) -> tuple[int, int]:
    # No row: the count was already at the limit, so nothing was added.
    return (bucket.limit, 0) if row is None else row


def _settle(
    futures: list[asyncio.Future], new_count: int, granted: int
) -> None:
    """Number the first `granted` requests in arrival order; deny the rest."""
    first = new_count - granted + 1
    for index, future in enumerate(futures):
        if future.done():
            # The request was cancelled while the batch ran. Its unit stays
            # counted, as every request that reaches the check counts.
            continue
        future.set_result(first + index if index < granted else None)


def _fail(futures: list[asyncio.Future], error: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(
                QuotaUnavailable(
                    f"daily quota not counted: {type(error).__name__}"
                )
            )
