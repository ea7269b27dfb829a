"""The hash chain and its verifier, on entries built in memory."""

import dataclasses
import datetime
import json
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
)

from services.audit import chain

KEY = Ed25519PrivateKey.generate()
KEYS = {chain.public_key_id(KEY.public_key()): KEY.public_key()}
CHAIN = uuid.uuid4()
START = datetime.datetime(2024, 12, 1, 8, 0, tzinfo=datetime.UTC)


def make_chain(count: int, first_seq: int = 1, prev=chain.GENESIS_HASH):
    entries = []
    for seq in range(first_seq, first_seq + count):
        entry = chain.link_entry(
            event_id=uuid.uuid4(),
            time=START + datetime.timedelta(seconds=seq),
            chain_id=CHAIN,
            seq=seq,
            org_id=str(CHAIN),
            key_id="key_0123456789abcdef",
            action="cds.clinical_review",
            resource_type="clinical_review",
            method="POST",
            endpoint="/v1/cds/clinical-review",
            status_code=200,
            grpc_status=0,
            response_time_ms=12,
            request_id=f"request-{seq}",
            client_address="127.0.0.1",
            prev_hash=prev,
        )
        entries.append(entry)
        prev = entry.hash

    return entries


def checkpoint_at(entries, seq: int, key=KEY, month_end=None):
    entry = next(entry for entry in entries if entry.seq == seq)

    return chain.sign_checkpoint(
        key,
        CHAIN,
        seq,
        entry.hash,
        START + datetime.timedelta(hours=1),
        month_end=month_end,
    )


MONTH_END = datetime.date(2024, 11, 30)
RETENTION_MONTHS = 12
# The first time at which 12 months of retention no longer keep the month
# of MONTH_END, so that a cut there is valid.
CUT_ALLOWED = datetime.datetime(2025, 12, 1, tzinfo=datetime.UTC)


def verify(entries, checkpoints=(), **options):
    """Verify with 12 months of retention at CUT_ALLOWED unless
    `options` set other values."""
    options = {
        "retention_months": RETENTION_MONTHS,
        "now": CUT_ALLOWED,
        **options,
    }

    return chain.verify_chain(CHAIN, entries, checkpoints, KEYS, **options)


class TestIntact:
    def test_intact_chain_verifies(self):
        entries = make_chain(10)

        result = verify(entries, [checkpoint_at(entries, 10)])

        assert result.intact, result.problems
        assert 10 == result.entries_checked
        assert 1 == result.checkpoints_checked

    def test_empty_chain_verifies(self):
        assert verify([]).intact

    def test_export_round_trip(self):
        """Entries and checkpoints read back from JSON verify the same."""
        entries = make_chain(3)
        point = checkpoint_at(entries, 3)

        result = verify(
            [chain.Entry.from_json(e.to_json()) for e in entries],
            [chain.Checkpoint.from_json(point.to_json())],
        )

        assert result.intact, result.problems


class TestTampering:
    def test_altered_field_named(self):
        entries = make_chain(10)
        entries[4] = dataclasses.replace(entries[4], status_code=403)

        result = verify(entries, [checkpoint_at(entries, 3)])

        [problem] = result.problems
        assert "altered" == problem.kind
        assert 5 == problem.seq
        assert str(entries[4].event_id) == problem.event_id

    def test_altered_and_rehashed_breaks_link(self):
        """Recomputing the altered entry's hash breaks the next link."""
        entries = make_chain(10)
        changed = dataclasses.replace(entries[4], status_code=403)
        entries[4] = dataclasses.replace(
            changed, hash=chain.entry_hash(changed.hashed_fields())
        )

        result = verify(entries, [checkpoint_at(entries, 2)])

        assert [("inserted", 6)] == [(p.kind, p.seq) for p in result.problems]

    def test_deleted_middle_entry_named(self):
        entries = make_chain(10)
        del entries[6]

        result = verify(entries, [checkpoint_at(entries, 2)])

        [problem] = result.problems
        assert "deleted" == problem.kind
        assert 7 == problem.seq

    def test_deleted_newest_caught_by_checkpoint(self):
        entries = make_chain(10)
        point = checkpoint_at(entries, 10)

        result = verify(entries[:7], [point])

        [problem] = result.problems
        assert "deleted" == problem.kind
        assert 8 == problem.seq
        assert "seq 10" in problem.message

    def test_inserted_duplicate_seq(self):
        entries = make_chain(5)
        copy = dataclasses.replace(entries[2], event_id=uuid.uuid4())
        entries.insert(3, copy)

        result = verify(entries, [checkpoint_at(entries, 1)])

        [problem] = result.problems
        assert ("inserted", 3) == (problem.kind, problem.seq)
        assert str(copy.event_id) == problem.event_id

    def test_rewritten_chain_differs_from_checkpoint(self):
        """A chain rebuilt after a change fails its signed checkpoint."""
        original = make_chain(6)
        point = checkpoint_at(original, 6)
        rebuilt = make_chain(6)

        result = verify(rebuilt, [point])

        assert ["altered"] == [problem.kind for problem in result.problems]

    def test_forged_checkpoint_rejected(self):
        entries = make_chain(4)
        forged = checkpoint_at(entries, 4, key=Ed25519PrivateKey.generate())

        result = verify(entries, [forged])

        assert {"checkpoint"} == {problem.kind for problem in result.problems}
        assert "trusted key" in result.problems[0].message


def forge(entry: chain.Entry, **changes) -> chain.Entry:
    """Build another entry at `entry`'s seq, linked to the same previous
    hash and with a hash that recomputes, as someone with the chain's
    fields but not its signing key can."""
    fields = dataclasses.asdict(entry)
    del fields["hash"]
    fields |= {"event_id": uuid.uuid4(), "status_code": 500} | changes

    return chain.link_entry(**fields)


def kinds_and_ids(result: chain.Verification) -> list[tuple[str, int, str]]:
    return [(p.kind, p.seq, p.event_id) for p in result.problems]


class TestRepeatedSeq:
    """Of two entries with one seq, the one the chain links to is kept."""

    @pytest.mark.parametrize("forged_first", [True, False])
    def test_forged_middle_entry_named(self, forged_first):
        """The next entry links to the genuine one, in either order."""
        entries = make_chain(6)
        forged = forge(entries[2])
        entries.insert(2 if forged_first else 3, forged)

        result = verify(entries, [checkpoint_at(entries, 6)])

        assert [("inserted", 3, str(forged.event_id))] == kinds_and_ids(result)
        assert 1 == result.first_seq
        assert 6 == result.last_seq

    @pytest.mark.parametrize("forged_first", [True, False])
    def test_forged_head_named_by_checkpoint(self, forged_first):
        """At the head, the checkpoint's hash names the genuine entry."""
        entries = make_chain(4)
        point = checkpoint_at(entries, 4)
        forged = forge(entries[3])
        entries.insert(3 if forged_first else 4, forged)

        result = verify(entries, [point])

        assert [("inserted", 4, str(forged.event_id))] == kinds_and_ids(result)
        assert 0 == result.unsigned_entries

    def test_forged_link_named(self):
        """An entry that links to no previous entry loses to one that
        does, even where nothing links to either."""
        entries = make_chain(4)
        forged = forge(entries[3], prev_hash=bytes(range(32)))
        entries.insert(3, forged)

        result = verify(entries, [checkpoint_at(entries, 2)])

        assert [("inserted", 4, str(forged.event_id))] == kinds_and_ids(result)
        assert 2 == result.unsigned_entries

    def test_indistinguishable_pair_reported_once(self):
        """An unsigned head and a forged twin that links as well: one
        problem names the second entry, and its message states that either
        may be the inserted one."""
        entries = make_chain(4)
        forged = forge(entries[3])
        entries.append(forged)

        result = verify(entries, [checkpoint_at(entries, 2)])

        [problem] = result.problems
        assert ("inserted", 4) == (problem.kind, problem.seq)
        assert str(forged.event_id) == problem.event_id
        assert str(entries[3].event_id) in problem.message
        assert "one of them was inserted" in problem.message

    def test_forged_copy_with_export_round_trip(self):
        """An export, which sorts entries by seq only, names the same
        entry."""
        entries = make_chain(5)
        point = checkpoint_at(entries, 5)
        forged = forge(entries[1])
        lines = [
            json.dumps(
                {
                    "type": "export",
                    "chain_id": str(CHAIN),
                    "last_removed_seq": 0,
                }
            ),
            json.dumps({"type": "entry", **forged.to_json()}),
            *(json.dumps({"type": "entry", **e.to_json()}) for e in entries),
            json.dumps({"type": "checkpoint", **point.to_json()}),
        ]

        result = chain.verify_export(lines, KEYS)

        assert [("inserted", 2, str(forged.event_id))] == kinds_and_ids(result)


class TestRetention:
    def test_cut_chain_links_to_checkpoint(self):
        """After a retention cut the trail starts at a signed checkpoint."""
        entries = make_chain(10)
        anchor = checkpoint_at(entries, 4, month_end=MONTH_END)

        result = verify(entries[4:], [anchor], last_removed_seq=4)

        assert result.intact, result.problems
        assert 5 == result.first_seq

    def test_cut_at_plain_checkpoint_is_deletion(self):
        """A cut anchored to a checkpoint that closes no month is forged."""
        entries = make_chain(10)
        anchor = checkpoint_at(entries, 4)

        result = verify(entries[4:], [anchor], last_removed_seq=4)

        assert "deleted" == result.problems[0].kind
        assert "month end" in result.problems[0].message

    def test_cut_without_checkpoint_reported(self):
        entries = make_chain(10)

        result = verify(entries[4:], [], last_removed_seq=4)

        assert "deleted" == result.problems[0].kind

    def test_whole_chain_cut_verifies(self):
        """A chain whose every entry the retention job removed has only
        checkpoints at or before its cut left."""
        entries = make_chain(6)
        points = [
            checkpoint_at(entries, 3, month_end=MONTH_END),
            checkpoint_at(entries, 6, month_end=MONTH_END),
        ]

        result = verify([], points, last_removed_seq=6)

        assert result.intact, result.problems
        assert 0 == result.entries_checked

    @pytest.mark.parametrize(
        ("now", "months"),
        [
            # Four days after the month ended, as a fake cut would be.
            (datetime.datetime(2024, 12, 4, tzinfo=datetime.UTC), 12),
            # The last moment at which 12 months still keep it.
            (CUT_ALLOWED - datetime.timedelta(microseconds=1), 12),
            (datetime.datetime(2025, 2, 1, tzinfo=datetime.UTC), 3),
        ],
    )
    def test_cut_of_kept_month_reported(self, now, months):
        """A cut at a month that the retention period still keeps is a
        deletion, even at a signed month-end checkpoint."""
        entries = make_chain(10)
        anchor = checkpoint_at(entries, 4, month_end=MONTH_END)

        result = verify(
            entries[4:],
            [anchor],
            last_removed_seq=4,
            now=now,
            retention_months=months,
        )

        [problem] = result.problems
        assert ("deleted", 4) == (problem.kind, problem.seq)
        assert "at the end of 2024-11" in problem.message
        assert f"retention period of {months} months" in problem.message
        assert months == result.retention_months

    def test_cut_of_expired_month_accepted(self):
        entries = make_chain(10)
        anchor = checkpoint_at(entries, 4, month_end=MONTH_END)
        now = datetime.datetime(2025, 3, 1, tzinfo=datetime.UTC)

        result = verify(
            entries[4:],
            [anchor],
            last_removed_seq=4,
            now=now,
            retention_months=3,
        )

        assert result.intact, result.problems

    def test_cut_without_retention_period_reported(self):
        entries = make_chain(10)
        anchor = checkpoint_at(entries, 4, month_end=MONTH_END)

        result = verify(
            entries[4:], [anchor], last_removed_seq=4, retention_months=0
        )

        [problem] = result.problems
        assert ("deleted", 4) == (problem.kind, problem.seq)
        assert "no retention period" in problem.message

    def test_segment_skips_cut_age(self):
        """The checkpointer and the retention job verify windows that
        start at any checkpoint, which is no retention cut."""
        entries = make_chain(10)
        anchor = checkpoint_at(entries, 4, month_end=MONTH_END)

        result = verify(
            entries[4:],
            [anchor],
            last_removed_seq=4,
            segment=True,
            retention_months=0,
        )

        assert result.intact, result.problems

    def test_entries_missing_after_cut(self):
        entries = make_chain(10)
        anchor = checkpoint_at(entries, 4, month_end=MONTH_END)

        result = verify(entries[6:], [anchor], last_removed_seq=4)

        [problem] = result.problems
        assert ("deleted", 5) == (problem.kind, problem.seq)


class TestUnsignedTail:
    def test_chain_without_checkpoint_unsigned(self):
        """Before its first checkpoint, a new chain verifies, with every
        entry unsigned since the first one's time."""
        entries = make_chain(7)

        result = verify(entries)

        assert result.intact, result.problems
        assert 7 == result.entries_checked
        assert 7 == result.unsigned_entries
        assert entries[0].time == result.unsigned_since

    def test_export_without_checkpoint_unsigned(self):
        entries = make_chain(3)
        lines = [
            json.dumps(
                {
                    "type": "export",
                    "chain_id": str(CHAIN),
                    "last_removed_seq": 0,
                }
            ),
            *(json.dumps({"type": "entry", **e.to_json()}) for e in entries),
        ]

        result = chain.verify_export(lines, KEYS)

        assert result.intact, result.problems
        assert 3 == result.unsigned_entries
        assert entries[0].time == result.unsigned_since

    def test_deleted_checkpoints_read_as_unsigned(self):
        """With every checkpoint deleted, which takes a superuser, the
        chain reads as unsigned: the same superuser could rewrite the
        entries' times, so nothing left proves a checkpoint existed."""
        entries = make_chain(10)

        result = verify(entries, [])

        assert result.intact, result.problems
        assert 10 == result.unsigned_entries

    def test_unsigned_chain_still_checked(self):
        """An entry altered before any checkpoint is still named."""
        entries = make_chain(5)
        entries[1] = dataclasses.replace(entries[1], status_code=500)

        result = verify(entries)

        assert [("altered", 2, str(entries[1].event_id))] == kinds_and_ids(
            result
        )

    def test_entries_after_checkpoint_counted(self):
        """Entries after the newest checkpoint are reported with the time
        of the oldest."""
        entries = make_chain(10)

        result = verify(entries, [checkpoint_at(entries, 7)])

        assert result.intact, result.problems
        assert 3 == result.unsigned_entries
        assert entries[7].time == result.unsigned_since

    def test_checkpoint_at_head_leaves_none(self):
        entries = make_chain(10)

        result = verify(entries, [checkpoint_at(entries, 10)])

        assert 0 == result.unsigned_entries
        assert result.unsigned_since is None

    def test_deleted_unsigned_entry_undetected(self):
        """Deleting the newest unsigned entries leaves an intact chain:
        only the unsigned count shows what is at risk."""
        entries = make_chain(10)

        result = verify(entries[:8], [checkpoint_at(entries, 7)])

        assert result.intact, result.problems
        assert 1 == result.unsigned_entries

    def test_untrusted_checkpoint_covers_nothing(self):
        entries = make_chain(5)
        foreign = checkpoint_at(entries, 5, key=Ed25519PrivateKey.generate())

        result = verify(entries, [foreign])

        assert 5 == result.unsigned_entries
        assert entries[0].time == result.unsigned_since

    def test_earliest_time_not_first_seq(self):
        """A request stored after a later one is the oldest unsigned."""
        entries = make_chain(6)
        fields = dataclasses.asdict(entries[5])
        del fields["hash"]
        fields["time"] = START - datetime.timedelta(minutes=1)
        late = chain.link_entry(**fields)

        result = verify([*entries[:5], late], [checkpoint_at(entries, 4)])

        assert result.intact, result.problems
        assert 2 == result.unsigned_entries
        assert late.time == result.unsigned_since


@pytest.mark.parametrize(
    "moment",
    [
        datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        datetime.datetime(
            2026,
            6,
            30,
            20,
            0,
            tzinfo=datetime.timezone(datetime.timedelta(hours=-5)),
        ),
    ],
)
def test_time_hashed_in_utc(moment):
    assert chain.utc_text(moment).endswith("Z")
    assert moment == datetime.datetime.strptime(
        chain.utc_text(moment), "%Y-%m-%dT%H:%M:%S.%fZ"
    ).replace(tzinfo=datetime.UTC)
