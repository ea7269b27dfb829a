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
import json
import uuid
from collections.abc import Iterable, Mapping
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


def chain_of(org_id: str | None) -> uuid.UUID:
    """Return the chain an entry of `org_id` belongs to."""
    return uuid.UUID(org_id) if org_id else UNAUTHENTICATED_CHAIN


def utc_text(value: datetime.datetime) -> str:
    """Render a time as RFC 3339 in UTC with microseconds, as hashed."""
    return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
    # Entries after the newest valid checkpoint. Deleting the newest of
    # them leaves a consistent chain, which the next checkpoint signs, so
    # such a deletion is never detected.
    unsigned_entries: int = 0
    # The earliest `time` among those entries; None when there are none.
    unsigned_since: datetime.datetime | None = None

    @property
    def intact(self) -> bool:
        return not self.problems


def verify_chain(
    chain_id: uuid.UUID,
    entries: Iterable[Entry],
    checkpoints: Iterable[Checkpoint],
    keys: Mapping[str, Ed25519PublicKey],
    last_removed_seq: int = 0,
    segment: bool = False,
) -> Verification:
    """Recompute one chain and compare it with its signed checkpoints.

    `entries` come in ascending `seq` order. `last_removed_seq` is where
    the retention job cut the chain; the first remaining entry must link
    to a signed month-end checkpoint at that sequence number. With
    `segment`, the entries are what followed the checkpoint at
    `last_removed_seq`, any kind, and need no checkpoint of their own: the
    checkpointer verifies them before it signs them.
    """
    result = Verification(chain_id)
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

    expected_seq = last_removed_seq + 1
    # None: nothing to link the next entry to, so its link goes unchecked.
    expected_prev: bytes | None = GENESIS_HASH
    if last_removed_seq:
        expected_prev = None
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
            anchor = None
        elif anchor is None:
            result.problems.append(
                Problem(
                    "deleted",
                    last_removed_seq,
                    "no signed checkpoint at the retention cut "
                    f"(seq {last_removed_seq}) to link the trail to",
                )
            )
        else:
            expected_prev = anchor.hash
    newest_signed = max(by_seq, default=0)
    recomputed: dict[int, bytes] = {}
    for entry in entries:
        if not result.entries_checked:
            result.first_seq = entry.seq
        result.entries_checked += 1
        if entry.seq > newest_signed:
            result.unsigned_entries += 1
            if (
                result.unsigned_since is None
                or entry.time < result.unsigned_since
            ):
                result.unsigned_since = entry.time
        if entry.seq < expected_seq:
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
        actual = entry_hash(entry.hashed_fields())
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

    if result.entries_checked and not by_seq and not segment:
        result.problems.append(
            Problem(
                "checkpoint",
                result.first_seq,
                "no checkpoint signed by a trusted key covers this chain, so "
                "nothing proves its entries were not rewritten",
            )
        )
    beyond = [
        point
        for seq, point in by_seq.items()
        if seq > result.last_seq and seq != last_removed_seq
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
    lines: Iterable[str], keys: Mapping[str, Ed25519PublicKey]
) -> Verification:
    """Verify an export of `GET /v1/audit:export` with trusted keys only.

    The export lists the keys that signed its checkpoints, but a copy of a
    key from the file proves nothing: pass the keys you trust.
    """
    chain_id = None
    last_removed_seq = 0
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

    return verify_chain(chain_id, entries, checkpoints, keys, last_removed_seq)
