"""Sign checkpoints of every chain's head, after verifying what is new.

The audit service runs this every ARXIO_AUDIT_CHECKPOINT_SECONDS. A chain
gets a new checkpoint only when the entries since its last checkpoint
recompute correctly, so a change made between two checkpoints is reported,
never signed. When a month closes, each chain's last entry of that month
gets a month-end checkpoint too: the retention job needs one there before
it drops the month. On its first run the checkpointer also signs the month
ends of older months that have none, such as months that closed while the
service was down.

With an anchor file, the checkpointer also remembers each chain's newest
checkpoint outside the database. It rejects, and does not sign, a chain
whose newest checkpoint in the database is missing, older than the
remembered one or different from it, because only a database superuser
could have removed or changed it. The rejection lasts until the
database matches the anchor file again and the service restarts.

An anchor file that contains no checkpoint while the database contains
some, as on a new replica, after a lost volume or a database restore,
gives nothing to compare with. The checkpointer then signs nothing until
the file is copied from another replica, or until one start with
`adopt_database` trusts the database's checkpoints as they are.
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
from services.audit.anchors import Anchor, AnchorFile
from services.audit.store import AuditStore
from services.common import metrics

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
        anchor_file: AnchorFile | None = None,
        adopt_database: bool = False,
    ) -> None:
        self._store = store
        self._key = key
        self._trusted_keys = trusted_keys
        self._clock = clock
        # Without an anchor file the remembered checkpoints live only in
        # this process, so a restart loses them.
        self._anchor_file = anchor_file
        self._anchors: dict[uuid.UUID, Anchor] = (
            anchor_file.read(trusted_keys) if anchor_file else {}
        )
        # True to remember the database's checkpoints on the first run
        # when the anchor file is empty. Otherwise nothing is signed while
        # the file is empty and the database contains any checkpoint.
        self._adopt_database = adopt_database
        # Entries stored this long before the start, with no checkpoint in
        # the database, mean that checkpoints were deleted: an audit
        # service that ran would have signed them. `run` sets it to two
        # checkpoint intervals.
        self._started = clock()
        self.unsigned_age = datetime.timedelta(minutes=2)
        # True until the first run compares an empty file with the database.
        self._file_unchecked = anchor_file is not None and not self._anchors
        # True once a run found the file empty but the database not. It
        # stays True until a restart.
        self.anchor_file_empty = False
        if adopt_database and not self._file_unchecked:
            log.warning(
                "audit.anchor_adopt_ignored",
                path=str(anchor_file.path) if anchor_file else None,
                chains=len(self._anchors),
                action="unset ARXIO_AUDIT_ANCHOR_ADOPT: it applies only to "
                "an empty anchor file",
            )
        # Chains rejected in this process, with the reason and the seq of
        # the newest checkpoint found when the rejection was last logged.
        self._rejected: dict[uuid.UUID, tuple[str, int]] = {}
        # The first day of the newest month whose end every chain has a
        # checkpoint for; None until the first run.
        self._month_ends_signed: datetime.date | None = None

    def anchor(self, chain_id: uuid.UUID) -> Anchor | None:
        """Return the chain's newest checkpoint that this process signed or
        saw. The database stored it before it was remembered."""
        return self._anchors.get(chain_id)

    async def _database_unanchored(
        self, heads: list[tuple[uuid.UUID, int, bytes, int]]
    ) -> bool:
        """Check an empty anchor file against the database's checkpoints.

        Returns True, after logging and counting, when nothing may be
        signed because the file is empty but the database contains
        checkpoints, or entries stored `unsigned_age` before the start and
        no checkpoint. With `adopt_database` the database's checkpoints
        are remembered by this run instead.
        """
        if not self._file_unchecked:
            return False
        checkpointed = sum(1 for head in heads if head[3] > 0)
        if checkpointed == 0 and not await self._store.entries_stored_before(
            self._started - self.unsigned_age
        ):
            # A fresh database: the file fills as chains are signed.
            self._file_unchecked = False
            return False
        if self._adopt_database:
            self._file_unchecked = False
            log.warning(
                "audit.anchors_adopted",
                path=str(self._anchor_file.path),
                chains=checkpointed,
                action="unset ARXIO_AUDIT_ANCHOR_ADOPT before the next start",
            )
            return False
        self.anchor_file_empty = True
        metrics.AUDIT_CHECKPOINT_REJECTIONS.labels("anchor_file_empty").inc()
        log.error(
            "audit.anchor_file_empty",
            path=str(self._anchor_file.path),
            chains_checkpointed=checkpointed,
            action="nothing is signed: copy another replica's anchor file "
            "to this path and restart, or restart once with "
            "ARXIO_AUDIT_ANCHOR_ADOPT=true to trust the database's "
            "checkpoints as they are",
        )

        return True

    def _remember(self, point: chain.Checkpoint) -> None:
        """Record `point` as its chain's newest checkpoint, in memory and in
        the anchor file."""
        self._anchors[point.chain_id] = Anchor(point.seq, point.hash)
        if self._anchor_file is not None:
            self._anchor_file.append(point)

    def _reject(
        self, chain_id: uuid.UUID, reason: str, found_seq: int
    ) -> None:
        metrics.AUDIT_CHECKPOINT_REJECTIONS.labels(reason).inc()
        # Logged when a chain is first rejected or its state changes, not
        # on every run; the counter counts every run.
        if self._rejected.get(chain_id) == (reason, found_seq):
            return
        self._rejected[chain_id] = (reason, found_seq)
        log.error(
            "audit.checkpoint_rejected",
            chain_id=str(chain_id),
            reason=reason,
            expected_seq=self._anchors[chain_id].seq,
            found_seq=found_seq,
            action="compare the chain with the anchor file and the "
            "organization's kept exports",
        )

    async def _anchor_holds(
        self, chain_id: uuid.UUID, signed_seq: int
    ) -> bool:
        """Check the chain's newest checkpoint in the database against the
        remembered one, and remember a newer valid one.

        Returns False, after logging and counting the rejection, when the
        chain must not be signed.
        """
        if chain_id in self._rejected:
            self._reject(chain_id, *self._rejected[chain_id])
            return False
        anchor = self._anchors.get(chain_id)
        if anchor is None and signed_seq == 0:
            return True
        if anchor is not None and signed_seq < anchor.seq:
            self._reject(chain_id, "checkpoint_missing", signed_seq)
            return False
        seqs = [signed_seq] if anchor is None else [anchor.seq, signed_seq]
        points = [
            point
            for point in await self._store.checkpoints_at(chain_id, seqs)
            if chain.signature_valid(point, self._trusted_keys)
        ]
        if anchor is not None and not any(
            point.seq == anchor.seq and point.hash == anchor.hash
            for point in points
        ):
            reason = (
                "checkpoint_changed"
                if any(point.seq == anchor.seq for point in points)
                else "checkpoint_missing"
            )
            self._reject(chain_id, reason, signed_seq)
            return False
        newest = [point for point in points if point.seq == signed_seq]
        if not newest:
            if anchor is None:
                # No remembered checkpoint to hold the chain to: the
                # verification in _checkpoint_head reports the invalid one.
                return True
            self._reject(chain_id, "checkpoint_invalid", signed_seq)
            return False
        if anchor is None or signed_seq > anchor.seq:
            self._remember(newest[0])

        return True

    async def _stored_checkpoint(
        self, signed: chain.Checkpoint
    ) -> chain.Checkpoint | None:
        """Return the stored plain checkpoint at `signed`'s seq if it is
        valid and has the same hash; log and return None otherwise."""
        for point in await self._store.checkpoints_at(
            signed.chain_id, [signed.seq]
        ):
            if (
                point.month_end is None
                and point.hash == signed.hash
                and chain.signature_valid(point, self._trusted_keys)
            ):
                return point
        log.error(
            "audit.checkpoint_conflict",
            chain_id=str(signed.chain_id),
            seq=signed.seq,
            action="verify the chain: the checkpoint stored at this seq "
            "has another hash or no valid signature",
        )

        return None

    async def _checkpoint_head(self, chain_id: uuid.UUID, signed_seq: int):
        anchors = await self._store.checkpoints_at(chain_id, [signed_seq])
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
        point = chain.sign_checkpoint(
            self._key, chain_id, head.seq, head.hash, self._clock()
        )
        # The database first: an anchor of a checkpoint that failed to
        # commit would make every later run reject the chain.
        if not await self._store.insert_checkpoint(point):
            # Another replica signed this seq first: the file records the
            # checkpoint that exports contain, the stored one.
            point = await self._stored_checkpoint(point)
            if point is None:
                return
        self._remember(point)
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
                # The first run after a restart tries its months again.
                if chain_id in self._rejected:
                    continue
                signed = await self._sign_month_end(chain_id, seq, month_end)
                complete = complete and signed
        # An entry left unsigned is tried again on the next run.
        if complete:
            self._month_ends_signed = start

    async def run_once(self) -> None:
        """Sign each chain's new head, then any month end not yet signed.

        A chain whose checkpoints no longer match the anchor file is not
        signed, and no chain is while the file is empty but the database
        is not (see the module's docstring).
        """
        heads = await self._store.chain_heads()
        if await self._database_unanchored(heads):
            return
        for chain_id, seq, _, signed_seq in heads:
            anchor = self._anchors.get(chain_id)
            # A chain checkpointed but not yet remembered is remembered.
            moved = signed_seq != (anchor.seq if anchor else 0)
            if seq > signed_seq or moved or chain_id in self._rejected:
                if not await self._anchor_holds(chain_id, signed_seq):
                    continue
            if seq > signed_seq:
                await self._checkpoint_head(chain_id, signed_seq)
        # A remembered chain that has no head any more lost all its rows.
        for chain_id in self._anchors.keys() - {head[0] for head in heads}:
            self._reject(chain_id, "checkpoint_missing", 0)
        await self._sign_month_ends()

    async def run(self, interval: float, stopping: asyncio.Event) -> None:
        self.unsigned_age = datetime.timedelta(seconds=2 * interval)
        while not stopping.is_set():
            try:
                await self.run_once()
            except SQLAlchemyError as error:
                log.error(
                    "audit.checkpoint_failed", error=type(error).__name__
                )
            except OSError as error:
                # A checkpoint already committed but missing from the file
                # is appended on the next run, as one found signed.
                log.error(
                    "audit.anchor_write_failed",
                    path=str(self._anchor_file.path)
                    if self._anchor_file
                    else None,
                    error=error.strerror,
                )
            try:
                await asyncio.wait_for(stopping.wait(), interval)
            except TimeoutError:
                pass


def anchor_problems(
    anchor: Anchor | None,
    anchor_file_empty: bool,
    checkpoints: list[chain.Checkpoint],
    keys: Mapping[str, Ed25519PublicKey],
) -> list[chain.Problem]:
    """Compare a chain's stored checkpoints with its anchor.

    `anchor` and `anchor_file_empty` must be read before `checkpoints`,
    because the checkpointer stores a checkpoint before it remembers it.
    Returns a "deleted" problem when the database has no valid checkpoint
    at the anchor's seq, and a "checkpoint" problem when the checkpoint
    there has another hash. When the checkpointer found the anchor file
    empty but the database not, it returns a "checkpoint" problem at seq 0.
    """
    if anchor_file_empty:
        return [
            chain.Problem(
                "checkpoint",
                0,
                "the audit service's anchor file contains no checkpoint "
                "while the database contains some, so deleted checkpoints go "
                "undetected: copy another replica's anchor file, or restart "
                "once with ARXIO_AUDIT_ANCHOR_ADOPT=true",
            )
        ]
    if anchor is None:
        return []
    valid = [
        point for point in checkpoints if chain.signature_valid(point, keys)
    ]
    if any(
        point.seq == anchor.seq and point.hash == anchor.hash
        for point in valid
    ):
        return []
    action = "compare the chain with the organization's kept exports"
    if any(point.seq == anchor.seq for point in valid):
        return [
            chain.Problem(
                "checkpoint",
                anchor.seq,
                f"the checkpoint at seq {anchor.seq} has another hash than "
                f"the one in the anchor file: {action}",
            )
        ]
    newest = max((point.seq for point in valid), default=0)
    found = (
        f"its newest valid checkpoint is at seq {newest}"
        if newest
        else "it has no valid checkpoint of this chain"
    )

    return [
        chain.Problem(
            "deleted",
            anchor.seq,
            f"the anchor file records a checkpoint at seq {anchor.seq}, "
            f"but the database has none there and {found}: {action}",
        )
    ]
