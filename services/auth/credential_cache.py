"""A short-lived cache of credentials, cleared by PostgreSQL notifications.

Every change to a key or an organization (revocation, rotation, expiry,
suspension, plan, IP allowlist) sends `NOTIFY arxio_auth_changes` in the
transaction that makes it. Each auth replica listens on its own connection
and clears its whole cache when a notification arrives, so a change is in
force on every replica as soon as it commits. Entries also expire after
`ttl` seconds, and while the listening connection is down nothing is cached
at all, so a missed notification can never keep a revoked key working.
"""

import asyncio
import time

import psycopg
import structlog

from services.auth.store import Credential

log = structlog.get_logger()

CHANNEL = "arxio_auth_changes"
MAX_ENTRIES = 10_000
RETRY_WAITS = (0.5, 1.0, 2.0, 5.0)


class CredentialCache:
    def __init__(self, ttl: float, clock=time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[bytes, tuple[Credential, float]] = {}
        # Set only while the listener hears notifications.
        self.listening = False

    def get(self, digest: bytes) -> Credential | None:
        if not self.listening:
            return None
        found = self._entries.get(digest)
        if found is None:
            return None
        credential, expires = found
        if self._clock() >= expires:
            del self._entries[digest]
            return None

        return credential

    def put(self, digest: bytes, credential: Credential) -> None:
        if not self.listening or self._ttl <= 0:
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[digest] = (credential, self._clock() + self._ttl)

    def clear(self) -> None:
        self._entries.clear()

    async def listen(self, conninfo: str, stopping: asyncio.Event) -> None:
        """Clear the cache on each notification until `stopping` is set."""
        failures = 0
        while not stopping.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True
                ) as connection:
                    await connection.execute(f"LISTEN {CHANNEL}")
                    self.clear()
                    self.listening = True
                    failures = 0
                    log.info("auth.cache_listening", channel=CHANNEL)
                    notifies = connection.notifies()
                    stop = asyncio.ensure_future(stopping.wait())
                    while not stopping.is_set():
                        following = asyncio.ensure_future(anext(notifies))
                        done, _ = await asyncio.wait(
                            {following, stop},
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                        if following not in done:
                            following.cancel()
                            break
                        following.result()
                        self.clear()
                    stop.cancel()
            except (psycopg.Error, OSError, StopAsyncIteration) as error:
                wait = RETRY_WAITS[min(failures, len(RETRY_WAITS) - 1)]
                failures += 1
                log.warning(
                    "auth.cache_listener_failed",
                    error=type(error).__name__,
                    retry_in_s=wait,
                    attempt=failures,
                )
                try:
                    await asyncio.wait_for(stopping.wait(), wait)
                except TimeoutError:
                    pass
            finally:
                self.listening = False
                self.clear()
