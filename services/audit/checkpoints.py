"""Sign checkpoints of every chain's head, after verifying what is new.

The audit service runs this every ARXIO_AUDIT_CHECKPOINT_SECONDS. A chain
gets a new checkpoint only when the entries since its last checkpoint
recompute correctly, so a change made between two checkpoints is reported,
never signed. When a month closes, each chain's last entry of that month
gets a month-end checkpoint too: the retention job needs one there before
it drops the month. On its first run the checkpointer also signs the month
ends of older months that have none, such as months that closed while the
service was down.
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
        # The first day of the newest month whose end every chain has a
        # checkpoint for; None until the first run.
        self._month_ends_signed: datetime.date | None = None

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

    async def _sign_month_end(
        self, chain_id: uuid.UUID, seq: int, month_end: datetime.date
    ) -> bool:
        """Sign entry `seq` as the chain's last entry of a month.

        The entries from the checkpoint before `seq` to the first one at or
        after it must verify first. Returns False when the entry is not
        signed: no checkpoint covers it yet, or the chain there is broken.
        """
        below, above = await self._store.nearest_checkpoints(chain_id, seq)
        if above is None:
            log.warning(
                "audit.month_checkpoint_deferred",
                chain_id=str(chain_id),
                seq=seq,
                reason="no checkpoint covers the entry yet",
            )
            return False
        start = below.seq if below is not None else 0
        entries = []
        async for entry in self._store.chain_entries(chain_id, start):
            if entry.seq > above.seq:
                break
            entries.append(entry)
        result = chain.verify_chain(
            chain_id,
            entries,
            [point for point in (below, above) if point is not None],
            self._trusted_keys,
            last_removed_seq=start,
            segment=True,
        )
        month_last = next((e for e in entries if e.seq == seq), None)
        if not result.intact or month_last is None:
            first = result.problems[0] if result.problems else None
            log.error(
                "audit.chain_broken",
                chain_id=str(chain_id),
                kind=first.kind if first else "deleted",
                seq=first.seq if first else seq,
                event_id=first.event_id if first else "",
            )
            return False
        await self._store.insert_checkpoint(
            chain.sign_checkpoint(
                self._key,
                chain_id,
                seq,
                month_last.hash,
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

        return True

    async def _sign_month_ends(self) -> None:
        start = month_start(self._clock())
        if self._month_ends_signed == start:
            return
        boundaries = [start]
        if self._month_ends_signed is None:
            # Each partition's first day ends the month before it.
            boundaries = sorted(
                {month for month in await self._store.partition_months()}
                | {start}
            )
            boundaries = [month for month in boundaries if month <= start]
        complete = True
        for boundary in boundaries:
            month_end = boundary - datetime.timedelta(days=1)
            for chain_id, seq, _ in await self._store.month_ends_to_sign(
                boundary
            ):
                signed = await self._sign_month_end(chain_id, seq, month_end)
                complete = complete and signed
        # An entry left unsigned is tried again on the next run.
        if complete:
            self._month_ends_signed = start

    async def run_once(self) -> None:
        """Sign each chain's new head, then any month end not yet signed."""
        for chain_id, seq, _, signed_seq in await self._store.chain_heads():
            if seq > signed_seq:
                await self._checkpoint_head(chain_id, signed_seq)
        await self._sign_month_ends()

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
