"""The hash chain and its verifier, on entries built in memory."""

import dataclasses
import datetime
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
)

from services.audit import chain

KEY = Ed25519PrivateKey.generate()
KEYS = {chain.public_key_id(KEY.public_key()): KEY.public_key()}
CHAIN = uuid.uuid4()
START = datetime.datetime(2026, 12, 1, 8, 0, tzinfo=datetime.UTC)


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


MONTH_END = datetime.date(2026, 11, 30)


def verify(entries, checkpoints=(), **options):
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

    def test_chain_without_checkpoint_not_intact(self):
        """Without a signed checkpoint nothing proves the chain unchanged."""
        result = verify(make_chain(10)[:7])

        assert ["checkpoint"] == [problem.kind for problem in result.problems]

    def test_inserted_duplicate_seq(self):
        entries = make_chain(5)
        entries.insert(
            3, dataclasses.replace(entries[2], event_id=uuid.uuid4())
        )

        result = verify(entries, [checkpoint_at(entries, 1)])

        assert "inserted" in {problem.kind for problem in result.problems}
        assert 3 == result.problems[0].seq

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

    def test_entries_missing_after_cut(self):
        entries = make_chain(10)
        anchor = checkpoint_at(entries, 4, month_end=MONTH_END)

        result = verify(entries[6:], [anchor], last_removed_seq=4)

        [problem] = result.problems
        assert ("deleted", 5) == (problem.kind, problem.seq)


class TestUnsignedTail:
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
