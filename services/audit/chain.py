"""The audit trail's hash chain, its signed checkpoints and its verifier.

Each organization's entries form one chain, numbered from 1. An entry's
hash is SHA-256 over a fixed prefix and the canonical JSON of its fields,
which include the previous entry's hash, so changing, removing or
reordering an entry breaks every link after it. Checkpoints sign the
sequence number and hash of a chain's head with the operator's Ed25519 key,
so deleting the newest entries, which leaves a shorter but consistent
chain, is caught as well.

This module has no database or network code: the service, the CLI and the
offline verification of an export all run the same functions.
"""

import base64
import dataclasses
import datetime
import hashlib
import itertools
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

# The chain of requests rejected before their key was known.
UNAUTHENTICATED_CHAIN = uuid.UUID(int=0)
GENESIS_HASH = bytes(32)
_ENTRY_PREFIX = b"arxio-audit-entry-v1\n"
_CHECKPOINT_PREFIX = b"arxio-audit-checkpoint-v1\n"
# Whole months before the current one that the retention job keeps, when
# ARXIO_AUDIT_RETENTION_MONTHS is not set.
DEFAULT_RETENTION_MONTHS = 12
# A hundred years: longer periods overflow the date arithmetic of a cut.
MAX_RETENTION_MONTHS = 1200


def chain_of(org_id: str | None) -> uuid.UUID:
    """Return the chain an entry of `org_id` belongs to."""
    return uuid.UUID(org_id) if org_id else UNAUTHENTICATED_CHAIN


def utc_text(value: datetime.datetime) -> str:
    """Render a time as RFC 3339 in UTC with microseconds, as hashed."""
    return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def retention_cutoff(now: datetime.datetime, months: int) -> datetime.datetime:
    """Return 00:00 UTC on the first day of the oldest month to keep.

    The current month and the `months` whole months before it are kept.
    """
    today = now.astimezone(datetime.UTC)
    index = today.year * 12 + today.month - 1 - months

    return datetime.datetime(
        index // 12, index % 12 + 1, 1, tzinfo=datetime.UTC
    )


@dataclass(frozen=True)
class Entry:
    """One audit entry with its place in its chain."""

    event_id: uuid.UUID
    time: datetime.datetime
    chain_id: uuid.UUID
    seq: int
    org_id: str | None
    key_id: str | None
    action: str
    resource_type: str
    method: str
    endpoint: str
    status_code: int
    grpc_status: int | None
    response_time_ms: int
    request_id: str
    client_address: str
    prev_hash: bytes
    hash: bytes

    def hashed_fields(self) -> dict:
        """Return the fields the hash covers, in their canonical form."""
        return {
            "event_id": str(self.event_id),
            "time": utc_text(self.time),
            "chain_id": str(self.chain_id),
            "seq": self.seq,
            "org_id": self.org_id,
            "key_id": self.key_id,
            "action": self.action,
            "resource_type": self.resource_type,
            "method": self.method,
            "endpoint": self.endpoint,
            "status_code": self.status_code,
            "grpc_status": self.grpc_status,
            "response_time_ms": self.response_time_ms,
            "request_id": self.request_id,
            "client_address": self.client_address,
            "prev_hash": self.prev_hash.hex(),
        }

    def to_json(self) -> dict:
        """Return the entry as exported: its hashed fields and its hash."""
        return {**self.hashed_fields(), "hash": self.hash.hex()}

    @classmethod
    def from_json(cls, data: Mapping) -> "Entry":
        return cls(
            event_id=uuid.UUID(data["event_id"]),
            time=datetime.datetime.strptime(
                data["time"], "%Y-%m-%dT%H:%M:%S.%fZ"
            ).replace(tzinfo=datetime.UTC),
            chain_id=uuid.UUID(data["chain_id"]),
            seq=int(data["seq"]),
            org_id=data["org_id"],
            key_id=data["key_id"],
            action=data["action"],
            resource_type=data["resource_type"],
            method=data["method"],
            endpoint=data["endpoint"],
            status_code=int(data["status_code"]),
            grpc_status=data["grpc_status"],
            response_time_ms=int(data["response_time_ms"]),
            request_id=data["request_id"],
            client_address=data["client_address"],
            prev_hash=bytes.fromhex(data["prev_hash"]),
            hash=bytes.fromhex(data["hash"]),
        )


def canonical_json(fields: Mapping) -> bytes:
    return json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode()


def entry_hash(fields: Mapping) -> bytes:
    """Hash an entry's canonical fields, the previous hash among them."""
    return hashlib.sha256(_ENTRY_PREFIX + canonical_json(fields)).digest()


def link_entry(**fields) -> Entry:
    """Build an entry from its fields and compute its hash."""
    draft = Entry(**fields, hash=b"")

    return dataclasses.replace(draft, hash=entry_hash(draft.hashed_fields()))


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement that a chain's entry `seq` has hash `hash`."""

    chain_id: uuid.UUID
    seq: int
    hash: bytes
    month_end: datetime.date | None
    issue_time: datetime.datetime
    public_key_id: str
    signature: bytes

    def signed_fields(self) -> dict:
        return {
            "chain_id": str(self.chain_id),
            "seq": self.seq,
            "hash": self.hash.hex(),
            "month_end": (
                self.month_end.isoformat() if self.month_end else None
            ),
            "issue_time": utc_text(self.issue_time),
            "public_key_id": self.public_key_id,
        }

    def to_json(self) -> dict:
        return {
            **self.signed_fields(),
            "signature": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_json(cls, data: Mapping) -> "Checkpoint":
        month_end = data["month_end"]
        return cls(
            chain_id=uuid.UUID(data["chain_id"]),
            seq=int(data["seq"]),
            hash=bytes.fromhex(data["hash"]),
            month_end=(
                datetime.date.fromisoformat(month_end) if month_end else None
            ),
            issue_time=datetime.datetime.strptime(
                data["issue_time"], "%Y-%m-%dT%H:%M:%S.%fZ"
            ).replace(tzinfo=datetime.UTC),
            public_key_id=data["public_key_id"],
            signature=base64.b64decode(data["signature"]),
        )


def public_key_id(key: Ed25519PublicKey) -> str:
    """Return a short id of a public key: its raw bytes' SHA-256, in hex."""
    raw = key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )

    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the audit public key must be an Ed25519 key")

    return key


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the audit signing key must be an Ed25519 key")

    return key


def sign_checkpoint(
    key: Ed25519PrivateKey,
    chain_id: uuid.UUID,
    seq: int,
    head_hash: bytes,
    issue_time: datetime.datetime,
    month_end: datetime.date | None = None,
) -> Checkpoint:
    unsigned = Checkpoint(
        chain_id=chain_id,
        seq=seq,
        hash=head_hash,
        month_end=month_end,
        issue_time=issue_time,
        public_key_id=public_key_id(key.public_key()),
        signature=bytes(64),
    )
    message = _CHECKPOINT_PREFIX + canonical_json(unsigned.signed_fields())

    return dataclasses.replace(unsigned, signature=key.sign(message))


def signature_valid(
    checkpoint: Checkpoint, keys: Mapping[str, Ed25519PublicKey]
) -> bool:
    key = keys.get(checkpoint.public_key_id)
    if key is None:
        return False
    message = _CHECKPOINT_PREFIX + canonical_json(checkpoint.signed_fields())
    try:
        key.verify(checkpoint.signature, message)
    except InvalidSignature:
        return False

    return True


@dataclass
class Problem:
    """One way in which the stored chain differs from what was recorded."""

    kind: str  # "altered", "inserted", "deleted" or "checkpoint"
    seq: int
    message: str
    event_id: str = ""


@dataclass
class Verification:
    chain_id: uuid.UUID
    entries_checked: int = 0
    checkpoints_checked: int = 0
    first_seq: int = 0
    last_seq: int = 0
    problems: list[Problem] = field(default_factory=list)
    # Entries after the newest valid checkpoint, or all of them before the
    # first one. Deleting the newest of them leaves a consistent chain,
    # which the next checkpoint signs, so such a deletion is never
    # detected.
    unsigned_entries: int = 0
    # The earliest `time` among those entries; None when there are none.
    unsigned_since: datetime.datetime | None = None
    # The retention period that a retention cut was checked against: only
    # a month that ended before the cutoff of this many months may be cut.
    # 0 when the caller gave none.
    retention_months: int = 0

    @property
    def intact(self) -> bool:
        return not self.problems


def _trusted_checkpoints(
    result: Verification,
    checkpoints: Iterable[Checkpoint],
    keys: Mapping[str, Ed25519PublicKey],
) -> dict[int, Checkpoint]:
    """Return the checkpoints of the chain signed by a trusted key, by seq.

    Each other checkpoint is reported as a problem.
    """
    chain_id = result.chain_id
    checkpoints = sorted(checkpoints, key=lambda point: point.seq)
    by_seq = {}
    for point in checkpoints:
        result.checkpoints_checked += 1
        if point.chain_id != chain_id:
            result.problems.append(
                Problem(
                    "checkpoint",
                    point.seq,
                    f"checkpoint at seq {point.seq} belongs to chain "
                    f"{point.chain_id}, not {chain_id}",
                )
            )
        elif not signature_valid(point, keys):
            result.problems.append(
                Problem(
                    "checkpoint",
                    point.seq,
                    f"checkpoint at seq {point.seq} has no valid signature "
                    f"of a trusted key (key id {point.public_key_id})",
                )
            )
        elif point.seq not in by_seq or point.month_end is not None:
            # A month-end checkpoint may share its entry with a plain one;
            # keep the month-end one, which a retention cut needs.
            by_seq[point.seq] = point

    return by_seq


def _check_cut_age(
    result: Verification, anchor: Checkpoint, now: datetime.datetime
) -> None:
    """Report a retention cut at the end of a month that the retention
    period still keeps: the month's entries were deleted, not expired."""
    seq = anchor.seq
    if not result.retention_months:
        result.problems.append(
            Problem(
                "deleted",
                seq,
                f"the retention cut at seq {seq} cannot be checked: no "
                "retention period was given, so pass the value of "
                "ARXIO_AUDIT_RETENTION_MONTHS",
            )
        )
        return
    cutoff = retention_cutoff(now, result.retention_months)
    month_after = anchor.month_end + datetime.timedelta(days=1)
    if month_after > cutoff.date():
        result.problems.append(
            Problem(
                "deleted",
                seq,
                f"the retention cut at seq {seq} is at the end of "
                f"{anchor.month_end:%Y-%m}, but a retention period of "
                f"{result.retention_months} months keeps the months from "
                f"{cutoff:%Y-%m} on ({utc_text(now)}): entries before it "
                "were deleted",
            )
        )


def _cut_anchor_hash(
    result: Verification,
    by_seq: Mapping[int, Checkpoint],
    last_removed_seq: int,
    segment: bool,
    now: datetime.datetime,
) -> bytes | None:
    """Return the hash that the first entry after a retention cut links
    to, or None when no usable checkpoint is at the cut (reported).

    Unless `segment` is set, a cut at a month that the retention period
    still keeps is reported, and its hash is returned all the same.
    """
    anchor = by_seq.get(last_removed_seq)
    # The retention job cuts a chain only at a month's last entry,
    # which the checkpointer signs as such when the month closes.
    if anchor is not None and anchor.month_end is None and not segment:
        result.problems.append(
            Problem(
                "deleted",
                last_removed_seq,
                f"the retention cut at seq {last_removed_seq} is not at "
                "a signed month end: entries before it were deleted",
            )
        )
        return None
    if anchor is None:
        result.problems.append(
            Problem(
                "deleted",
                last_removed_seq,
                "no signed checkpoint at the retention cut "
                f"(seq {last_removed_seq}) to link the trail to",
            )
        )
        return None
    if not segment:
        _check_cut_age(result, anchor, now)

    return anchor.hash


def _seq_runs(
    entries: Iterable[Entry],
) -> Iterator[tuple[list[Entry], list[Entry]]]:
    """Yield each run of consecutive entries with the same seq, together
    with the run after it ([] after the last run)."""
    runs = (
        list(run)
        for _, run in itertools.groupby(entries, key=lambda entry: entry.seq)
    )
    current = next(runs, None)
    for following in runs:
        yield current, following
        current = following
    if current is not None:
        yield current, []


def _genuine_index(
    run: list[Entry],
    recomputed: list[bytes],
    expected_prev: bytes | None,
    following: list[Entry],
    point: Checkpoint | None,
) -> tuple[int, bool]:
    """Pick the entry that the chain links to among entries with one seq.

    The evidence, strongest first: a trusted checkpoint signs the hash
    that the entry's fields recompute to, the next entry links to that
    hash, the entry links to the entry before it, and its stored hash
    recomputes. Returns the index of the entry with the most evidence and
    whether no other entry has as much.
    """

    def evidence(index: int) -> tuple[bool, bool, bool, bool]:
        entry = run[index]
        actual = recomputed[index]
        return (
            point is not None and point.hash == actual,
            any(
                after.seq == entry.seq + 1 and after.prev_hash == actual
                for after in following
            ),
            expected_prev is None or entry.prev_hash == expected_prev,
            actual == entry.hash,
        )

    scores = [evidence(index) for index in range(len(run))]
    best = max(scores)

    return scores.index(best), scores.count(best) == 1


def _report_repeats(
    result: Verification, run: list[Entry], genuine: int, certain: bool
) -> None:
    """Report each entry of `run` but the genuine one as inserted."""
    genuine_entry = run[genuine]
    for index, entry in enumerate(run):
        if index == genuine:
            continue
        message = (
            f"entry {entry.event_id} repeats seq {entry.seq} of entry "
            f"{genuine_entry.event_id}, which the chain links to"
        )
        if not certain:
            message = (
                f"entries {genuine_entry.event_id} and {entry.event_id} "
                f"both have seq {entry.seq}, and no link or checkpoint "
                "shows which one the chain recorded: one of them was "
                "inserted"
            )
        result.problems.append(
            Problem("inserted", entry.seq, message, str(entry.event_id))
        )


def verify_chain(
    chain_id: uuid.UUID,
    entries: Iterable[Entry],
    checkpoints: Iterable[Checkpoint],
    keys: Mapping[str, Ed25519PublicKey],
    last_removed_seq: int = 0,
    segment: bool = False,
    retention_months: int = 0,
    now: datetime.datetime | None = None,
) -> Verification:
    """Recompute one chain and compare it with its signed checkpoints.

    `entries` come in ascending `seq` order. Of two or more entries with
    one seq, the one that the chain links to is kept and the others are
    reported as inserted. `last_removed_seq` is where the retention job
    cut the chain; the first remaining entry must link to a signed
    month-end checkpoint at that sequence number. With `segment`, the
    entries are what followed the checkpoint at `last_removed_seq`, any
    kind. Entries after the newest trusted checkpoint, or all of them when
    there is none yet, are counted as unsigned and are no problem.

    Without `segment`, the month that ends at the cut must have ended
    before the cutoff of `retention_months` at `now` (default: the current
    time), as the retention job requires when it drops a month. A cut with
    no `retention_months` given is reported as unchecked.
    """
    result = Verification(chain_id, retention_months=retention_months)
    by_seq = _trusted_checkpoints(result, checkpoints, keys)
    expected_seq = last_removed_seq + 1
    # None: nothing to link the next entry to, so its link goes unchecked.
    expected_prev: bytes | None = GENESIS_HASH
    if last_removed_seq:
        expected_prev = _cut_anchor_hash(
            result,
            by_seq,
            last_removed_seq,
            segment,
            now or datetime.datetime.now(datetime.UTC),
        )
    # NOTE: a chain whose checkpoints a superuser deleted reads as unsigned,
    # not broken: they could rewrite its entries and times just as well.
    newest_signed = max(by_seq, default=0)
    recomputed: dict[int, bytes] = {}
    for run, following in _seq_runs(entries):
        if not result.entries_checked:
            result.first_seq = run[0].seq
        result.entries_checked += len(run)
        if run[0].seq < expected_seq:
            for entry in run:
                result.problems.append(
                    Problem(
                        "inserted",
                        entry.seq,
                        f"entry {entry.event_id} repeats seq {entry.seq}, "
                        f"after seq {expected_seq - 1}",
                        str(entry.event_id),
                    )
                )
            continue
        hashes = [entry_hash(entry.hashed_fields()) for entry in run]
        genuine = 0
        if len(run) > 1:
            genuine, certain = _genuine_index(
                run,
                hashes,
                expected_prev if run[0].seq == expected_seq else None,
                following,
                by_seq.get(run[0].seq),
            )
            _report_repeats(result, run, genuine, certain)
        entry, actual = run[genuine], hashes[genuine]
        if entry.seq > newest_signed:
            result.unsigned_entries += 1
            if (
                result.unsigned_since is None
                or entry.time < result.unsigned_since
            ):
                result.unsigned_since = entry.time
        if entry.seq > expected_seq:
            missing = (
                f"seq {expected_seq}"
                if entry.seq == expected_seq + 1
                else f"seq {expected_seq} to {entry.seq - 1}"
            )
            result.problems.append(
                Problem(
                    "deleted",
                    expected_seq,
                    f"entries {missing} are missing before entry "
                    f"{entry.event_id}",
                    str(entry.event_id),
                )
            )
            expected_prev = entry.prev_hash
        elif expected_prev is not None and entry.prev_hash != expected_prev:
            result.problems.append(
                Problem(
                    "inserted",
                    entry.seq,
                    f"entry {entry.event_id} at seq {entry.seq} does not "
                    "link to the entry before it",
                    str(entry.event_id),
                )
            )
        if actual != entry.hash:
            result.problems.append(
                Problem(
                    "altered",
                    entry.seq,
                    f"entry {entry.event_id} at seq {entry.seq} was "
                    "altered: its fields do not match its hash",
                    str(entry.event_id),
                )
            )
        recomputed[entry.seq] = actual
        expected_prev = entry.hash
        expected_seq = entry.seq + 1
        result.last_seq = entry.seq

    # Checkpoints at or before the retention cut sign removed entries.
    beyond = [
        point
        for seq, point in by_seq.items()
        if seq > max(result.last_seq, last_removed_seq)
    ]
    if beyond:
        newest = max(beyond, key=lambda point: point.seq)
        result.problems.append(
            Problem(
                "deleted",
                result.last_seq + 1,
                f"entries after seq {result.last_seq} are missing: a "
                f"checkpoint signed on {utc_text(newest.issue_time)} "
                f"covers seq {newest.seq}",
            )
        )
    for seq, point in by_seq.items():
        if seq in recomputed and recomputed[seq] != point.hash:
            result.problems.append(
                Problem(
                    "altered",
                    seq,
                    f"the chain up to seq {seq} differs from its signed "
                    "checkpoint",
                )
            )
    result.problems.sort(key=lambda problem: problem.seq)

    return result


def verify_export(
    lines: Iterable[str],
    keys: Mapping[str, Ed25519PublicKey],
    retention_months: int | None = None,
) -> Verification:
    """Verify an export of `GET /v1/audit:export` with trusted keys only.

    The export lists the keys that signed its checkpoints, but a copy of a
    key from the file proves nothing: pass the keys you trust. A retention
    cut is checked against `retention_months`. The export's header is not
    signed, so without that argument the check takes the longer of the
    header's `retention_months` and DEFAULT_RETENTION_MONTHS, at the
    earlier of the header's `export_time` and now: an edited header can
    only make the check stricter.
    """
    chain_id = None
    last_removed_seq = 0
    header_months = 0
    export_time = None
    entries: list[Entry] = []
    checkpoints: list[Checkpoint] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind = record.get("type")
            if kind == "export":
                chain_id = uuid.UUID(record["chain_id"])
                last_removed_seq = int(record["last_removed_seq"])
                header_months = record.get("retention_months", 0)
                if "retention_months" in record and not (
                    type(header_months) is int
                    and 1 <= header_months <= MAX_RETENTION_MONTHS
                ):
                    raise ValueError(
                        f"invalid retention_months {header_months!r}: must "
                        f"be an integer from 1 to {MAX_RETENTION_MONTHS}"
                    )
                if "export_time" in record:
                    export_time = datetime.datetime.fromisoformat(
                        record["export_time"]
                    )
                    if export_time.tzinfo is None:
                        raise ValueError(
                            f"invalid export_time {record['export_time']!r}:"
                            " must be a UTC time ending in Z"
                        )
            elif kind == "entry":
                entries.append(Entry.from_json(record))
            elif kind == "checkpoint":
                checkpoints.append(Checkpoint.from_json(record))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"line {number} of the export is invalid: {error}"
            ) from None
    if chain_id is None:
        raise ValueError(
            'the export has no {"type": "export"} line: is it the output '
            "of GET /v1/audit:export?"
        )
    entries.sort(key=lambda entry: entry.seq)
    now = datetime.datetime.now(datetime.UTC)
    if export_time is not None:
        now = min(now, export_time)

    return verify_chain(
        chain_id,
        entries,
        checkpoints,
        keys,
        last_removed_seq,
        retention_months=retention_months
        or max(header_months, DEFAULT_RETENTION_MONTHS),
        now=now,
    )
