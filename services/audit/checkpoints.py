"""Sign checkpoints of every chain's head, after verifying what is new.

The audit service runs this periodically. A chain gets a new checkpoint
only when the entries since its last checkpoint recompute correctly, so a
change made between two checkpoints is reported, never signed. When a
month closes, each chain's last entry of that month gets a checkpoint too:
the retention job needs one there before it drops the month.
"""

import asyncio
import datetime
import uuid
from collections.abc import Callable, Mapping

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from sqlalchemy.exc import SQLAlchemyError

from services.audit import chain
from services.audit.store import AuditStore

log = structlog.get_logger()


def month_start(now: datetime.datetime) -> datetime.date:
    """Return the first day of `now`'s month in UTC."""
    return now.astimezone(datetime.UTC).date().replace(day=1)


class Checkpointer:
    def __init__(
        self,
        store: AuditStore,
        key: Ed25519PrivateKey,
        trusted_keys: Mapping[str, Ed25519PublicKey],
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(
            datetime.UTC
        ),
    ) -> None:
        self._store = store
        self._key = key
        self._trusted_keys = trusted_keys
        self._clock = clock
        self._months_closed: set[datetime.date] = set()

    async def _checkpoint_head(self, chain_id: uuid.UUID, signed_seq: int):
        anchors = [
            point
            for point in await self._store.checkpoints(chain_id)
            if point.seq == signed_seq
        ]
        entries = [
            entry
            async for entry in self._store.chain_entries(chain_id, signed_seq)
        ]
        if not entries:
            return
        result = chain.verify_chain(
            chain_id,
            entries,
            anchors,
            self._trusted_keys,
            last_removed_seq=signed_seq,
            segment=True,
        )
        if not result.intact:
            first = result.problems[0]
            log.error(
                "audit.chain_broken",
                chain_id=str(chain_id),
                kind=first.kind,
                seq=first.seq,
                event_id=first.event_id,
            )
            return
        head = entries[-1]
        await self._store.insert_checkpoint(
            chain.sign_checkpoint(
                self._key, chain_id, head.seq, head.hash, self._clock()
            )
        )
        log.info(
            "audit.checkpoint_signed",
            chain_id=str(chain_id),
            seq=head.seq,
            entries_verified=len(entries),
        )

    async def run_once(self) -> None:
        for chain_id, seq, _, signed_seq in await self._store.chain_heads():
            if seq > signed_seq:
                await self._checkpoint_head(chain_id, signed_seq)
        start = month_start(self._clock())
        if start in self._months_closed:
            return
        month_end = start - datetime.timedelta(days=1)
        for chain_id, seq, head_hash in await self._store.month_ends_to_sign(
            start
        ):
            await self._store.insert_checkpoint(
                chain.sign_checkpoint(
                    self._key,
                    chain_id,
                    seq,
                    head_hash,
                    self._clock(),
                    month_end=month_end,
                )
            )
            log.info(
                "audit.month_checkpoint_signed",
                chain_id=str(chain_id),
                seq=seq,
                month_end=month_end.isoformat(),
            )
        self._months_closed.add(start)

    async def run(self, interval: float, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.run_once()
            except SQLAlchemyError as error:
                log.error(
                    "audit.checkpoint_failed", error=type(error).__name__
                )
            try:
                await asyncio.wait_for(stopping.wait(), interval)
            except TimeoutError:
                pass
