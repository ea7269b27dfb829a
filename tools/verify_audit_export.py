#!/usr/bin/env python3
"""Verify an arxio audit trail export offline, with no arxio code.

    python3 verify_audit_export.py EXPORT --public-key SIGNING.pub
        [--public-key OLDER.pub ...] [--earlier-export OLD_EXPORT ...]
        [--retention-months N]

EXPORT is the body of `GET /v1/audit:export`. Each --public-key is a PEM
file of an Ed25519 key whose checkpoint signatures you trust. Get it from
the operator by a channel other than the export. The public keys inside
the export are ignored, because a copy of a key from the file proves
nothing. Each --earlier-export is an export of the same chain that
you kept from before: its checkpoints are checked against EXPORT too.

Prints a JSON report and exits with 0 when the trail is intact, 3 when it
is not, and 2 when a file cannot be read or is not an export. Needs only
Python's standard library and the `cryptography` package. docs/audit.md
in the arxio repository describes the format and each rule checked here.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import itertools
import json
import sys
from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PublicKey,
)

ENTRY_PREFIX = b"arxio-audit-entry-v1\n"
CHECKPOINT_PREFIX = b"arxio-audit-checkpoint-v1\n"
# The prev_hash of a chain's first entry: 32 zero bytes.
GENESIS_HASH = "0" * 64
# The members of an entry line that its hash covers.
ENTRY_FIELDS = (
    "event_id",
    "time",
    "chain_id",
    "seq",
    "org_id",
    "key_id",
    "action",
    "resource_type",
    "method",
    "endpoint",
    "status_code",
    "grpc_status",
    "response_time_ms",
    "request_id",
    "client_address",
    "prev_hash",
)
# The members of a checkpoint line that its signature covers.
CHECKPOINT_FIELDS = (
    "chain_id",
    "seq",
    "hash",
    "month_end",
    "issue_time",
    "public_key_id",
)
EXIT_INVALID_INPUT = 2
# Retention months assumed when neither the caller nor a longer header
# value gives any: the product's default.
DEFAULT_RETENTION_MONTHS = 12
# A hundred years: longer periods overflow the date arithmetic of a cut.
MAX_RETENTION_MONTHS = 1200
EXIT_NOT_INTACT = 3


class InvalidInput(Exception):
    """A file that is not a readable export or public key."""


def canonical_json(fields: dict) -> bytes:
    """Serialize fields as hashes and signatures cover them: members
    sorted by name, no whitespace, every character outside printable
    ASCII as a lowercase \\u escape."""
    return json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode("ascii")


def entry_hash(entry: dict) -> str:
    """Compute an entry's hash, in hex, from its hashed members."""
    fields = {name: entry[name] for name in ENTRY_FIELDS}

    return hashlib.sha256(ENTRY_PREFIX + canonical_json(fields)).hexdigest()


def public_key_id(key: Ed25519PublicKey) -> str:
    """Return a key's id: the first 16 hex digits of the SHA-256 of its
    32 raw bytes."""
    raw = key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )

    return hashlib.sha256(raw).hexdigest()[:16]


def load_trusted_keys(paths: list) -> dict:
    """Step 2: read PEM public keys into a map from key id to key."""
    keys = {}
    for path in paths:
        try:
            with open(path, "rb") as file:
                key = serialization.load_pem_public_key(file.read())
        except (OSError, ValueError, UnsupportedAlgorithm) as error:
            raise InvalidInput(
                f"invalid public key {path}: {error}. Pass a PEM file of "
                "the operator's checkpoint-signing public key"
            ) from None
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidInput(
                f"public key {path} is not an Ed25519 key: pass the public "
                "key of the audit service's checkpoint-signing key"
            )
        keys[public_key_id(key)] = key

    return keys


def signature_valid(point: dict, keys: dict) -> bool:
    """Check a checkpoint's Ed25519 signature with the trusted key that
    its public_key_id names."""
    key = keys.get(point["public_key_id"])
    if key is None:
        return False
    try:
        signature = base64.b64decode(point["signature"], validate=True)
    except ValueError:
        return False
    fields = {name: point[name] for name in CHECKPOINT_FIELDS}
    try:
        key.verify(signature, CHECKPOINT_PREFIX + canonical_json(fields))
    except InvalidSignature:
        return False

    return True


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_record(record: dict) -> None:
    """Raise ValueError unless a line has the members verification reads,
    of the right JSON types. Values are checked by the hash or signature."""
    kind = record.get("type")
    if kind == "export":
        required = ("chain_id", "last_removed_seq")
    elif kind == "entry":
        required = (*ENTRY_FIELDS, "hash")
    elif kind == "checkpoint":
        required = (*CHECKPOINT_FIELDS, "signature")
    else:
        return
    missing = [name for name in required if name not in record]
    if missing:
        raise ValueError(f"{kind} line is missing {', '.join(missing)}")
    if kind == "export":
        _check_retention_members(record)
    seq_name = "last_removed_seq" if kind == "export" else "seq"
    if not _is_integer(record[seq_name]) or record[seq_name] < 0:
        raise ValueError(
            f"invalid {seq_name} {record[seq_name]!r}: must be a JSON "
            "integer, 0 or more"
        )
    text_fields = (
        "chain_id",
        "hash",
        "prev_hash",
        "event_id",
        "time",
        "public_key_id",
        "signature",
    )
    for name in text_fields:
        if name in required and not isinstance(record[name], str):
            raise ValueError(
                f"invalid {name} {record[name]!r}: must be a JSON string"
            )


def _check_retention_members(header: dict) -> None:
    """Raise ValueError unless the header's optional `retention_months`
    is an integer from 1 to MAX_RETENTION_MONTHS and its `export_time` a
    UTC time."""
    months = header.get("retention_months", 1)
    if not _is_integer(months) or not 1 <= months <= MAX_RETENTION_MONTHS:
        raise ValueError(
            f"invalid retention_months {months!r}: must be a JSON integer "
            f"from 1 to {MAX_RETENTION_MONTHS}"
        )
    if "export_time" in header:
        try:
            parse_time(header["export_time"])
        except (TypeError, ValueError):
            raise ValueError(
                f"invalid export_time {header['export_time']!r}: must be "
                "a UTC time such as 2026-12-01T08:01:00.250000Z"
            ) from None


def parse_time(text: str) -> datetime.datetime:
    """Parse a time in the export's form, RFC 3339 in UTC."""
    value = datetime.datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")

    return value


def retention_cutoff(now: datetime.datetime, months: int) -> datetime.date:
    """Return the first day of the oldest month that `months` of retention
    keep at `now`: the current month and `months` whole months before."""
    today = now.astimezone(datetime.UTC)
    index = today.year * 12 + today.month - 1 - months

    return datetime.date(index // 12, index % 12 + 1, 1)


def read_export(path: str) -> tuple[dict, list, list]:
    """Step 1: read an export into its header, entry lines and checkpoint
    lines, the entries in seq order."""
    header = None
    entries = []
    checkpoints = []
    try:
        with open(path, encoding="utf-8") as file:
            lines = list(file)
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInput(f"cannot read export {path}: {error}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            _check_record(record)
        except ValueError as error:
            raise InvalidInput(f"{path}, line {number}: {error}") from None
        if record.get("type") == "export":
            if header is not None:
                raise InvalidInput(
                    f"{path}, line {number}: a second export header line, "
                    "but an export has one, on its first line"
                )
            header = record
        elif record.get("type") == "entry":
            entries.append(record)
        elif record.get("type") == "checkpoint":
            checkpoints.append(record)
    if header is None:
        raise InvalidInput(
            f'{path} has no {{"type": "export"}} line: is it the body of '
            "GET /v1/audit:export?"
        )
    # A stable sort: rows that repeat a seq keep their order in the file.
    entries.sort(key=lambda entry: entry["seq"])

    return header, entries, checkpoints


def problem(kind: str, seq: int, message: str, event_id: str = "") -> dict:
    """Build one problem of the report."""
    return {"kind": kind, "seq": seq, "eventId": event_id, "message": message}


def trusted_checkpoints(
    chain_id: str, checkpoints: list, keys: dict, problems: list
) -> dict:
    """Step 3: return this chain's checkpoints that a trusted key signed,
    one per seq, and report every other checkpoint.

    A month-end checkpoint wins over a plain one at the same entry,
    because a retention cut needs it.
    """
    signed = {}
    for point in sorted(checkpoints, key=lambda point: point["seq"]):
        seq = point["seq"]
        if point["chain_id"] != chain_id:
            message = (
                f"checkpoint at seq {seq} belongs to chain "
                f"{point['chain_id']}, not {chain_id}"
            )
            problems.append(problem("checkpoint", seq, message))
        elif not signature_valid(point, keys):
            message = (
                f"checkpoint at seq {seq} has no valid signature of a "
                f"trusted key (key id {point['public_key_id']})"
            )
            problems.append(problem("checkpoint", seq, message))
        elif seq not in signed or point["month_end"] is not None:
            signed[seq] = point

    return signed


def cut_age_problems(
    anchor: dict, retention_months: int, now: datetime.datetime
) -> list:
    """Step 4, second part: a cut is valid only at the end of a month that
    the retention period no longer keeps at `now`."""
    seq = anchor["seq"]
    if not retention_months:
        message = (
            f"the retention cut at seq {seq} cannot be checked: no "
            "retention period was given, so pass the value of "
            "ARXIO_AUDIT_RETENTION_MONTHS"
        )
        return [problem("deleted", seq, message)]
    cutoff = retention_cutoff(now, retention_months)
    month_end = datetime.date.fromisoformat(anchor["month_end"])
    if month_end + datetime.timedelta(days=1) <= cutoff:
        return []
    now_text = now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    message = (
        f"the retention cut at seq {seq} is at the end of "
        f"{month_end:%Y-%m}, but a retention period of {retention_months} "
        f"months keeps the months from {cutoff:%Y-%m} on ({now_text}): "
        "entries before it were deleted"
    )

    return [problem("deleted", seq, message)]


def start_hash(
    last_removed_seq: int,
    signed: dict,
    problems: list,
    retention_months: int,
    now: datetime.datetime,
) -> str | None:
    """Step 4: return the hash that the first entry must link to.

    That is the genesis hash, or after a retention cut, the hash of the
    signed month-end checkpoint at the cut. Returns None, so that the
    first link goes unchecked, when no such checkpoint is there (reported).
    A cut at a month that the retention period still keeps is reported,
    and the checkpoint's hash is returned all the same.
    """
    if not last_removed_seq:
        return GENESIS_HASH
    anchor = signed.get(last_removed_seq)
    if anchor is None:
        message = (
            "no signed checkpoint at the retention cut "
            f"(seq {last_removed_seq}) to link the trail to"
        )
        problems.append(problem("deleted", last_removed_seq, message))
        return None
    if anchor["month_end"] is None:
        message = (
            f"the retention cut at seq {last_removed_seq} is not at a "
            "signed month end: entries before it were deleted"
        )
        problems.append(problem("deleted", last_removed_seq, message))
        return None
    problems += cut_age_problems(anchor, retention_months, now)

    return anchor["hash"]


def genuine_index(
    run: list,
    hashes: list,
    expected_prev: str | None,
    following: list,
    point: dict | None,
) -> tuple[int, bool]:
    """Pick the entry that the chain links to among entries with one seq.

    The evidence, strongest first, is four tests. The trusted checkpoint
    at the seq signs the entry's recomputed hash. An entry of the next seq
    links to that hash. The entry links to the entry before it, which is
    always true when `expected_prev` is None. Its stored hash recomputes.

    Returns the index of the entry with the most evidence, the first one
    on a tie, and whether no other entry has as much.
    """
    scores = []
    for index, entry in enumerate(run):
        actual = hashes[index]
        links_forward = any(
            after["seq"] == entry["seq"] + 1 and after["prev_hash"] == actual
            for after in following
        )
        scores.append(
            (
                point is not None and point["hash"] == actual,
                links_forward,
                expected_prev is None or entry["prev_hash"] == expected_prev,
                actual == entry["hash"],
            )
        )
    best = max(scores)

    return scores.index(best), scores.count(best) == 1


def repeat_problems(run: list, genuine: int, certain: bool) -> list:
    """Report each entry of a run but the genuine one as inserted."""
    seq = run[genuine]["seq"]
    genuine_event_id = run[genuine]["event_id"]
    problems = []
    for index, entry in enumerate(run):
        if index == genuine:
            continue
        message = (
            f"entry {entry['event_id']} repeats seq {seq} of entry "
            f"{genuine_event_id}, which the chain links to"
        )
        if not certain:
            message = (
                f"entries {genuine_event_id} and {entry['event_id']} both "
                f"have seq {seq}, and no link or checkpoint shows which one "
                "the chain recorded: one of them was inserted"
            )
        problems.append(problem("inserted", seq, message, entry["event_id"]))

    return problems


def missing_checkpoints(checkpoints: list, earlier: list) -> list:
    """Report each checkpoint of an earlier export that this export lacks.

    The audit service never deletes a checkpoint, so a missing one was
    deleted in the database.
    """
    present = {(point["seq"], point["signature"]) for point in checkpoints}
    problems = []
    for point in earlier:
        if (point["seq"], point["signature"]) not in present:
            message = (
                f"the checkpoint at seq {point['seq']} signed on "
                f"{point['issue_time']}, which an earlier export has, is "
                "missing: checkpoints are never deleted"
            )
            problems.append(problem("checkpoint", point["seq"], message))

    return problems


def verify(
    header: dict,
    entries: list,
    checkpoints: list,
    keys: dict,
    earlier_checkpoints: Sequence = (),
    retention_months: int | None = None,
) -> dict:
    """Recompute the chain and compare it with its trusted checkpoints,
    those of earlier exports of the chain included.

    A retention cut is checked against `retention_months`. The header is
    not signed, so without it the check takes the longer of the header's
    retention_months and 12, at the earlier of the header's export_time
    and the current time: an edited header can only make it stricter.

    Returns the report that is printed: the problems in seq order, and the
    entries that no trusted checkpoint covers yet. The steps are numbered
    as in the procedure of docs/audit.md.
    """
    chain_id = header["chain_id"]
    last_removed_seq = header["last_removed_seq"]
    problems = missing_checkpoints(checkpoints, earlier_checkpoints)
    signed = trusted_checkpoints(
        chain_id, [*checkpoints, *earlier_checkpoints], keys, problems
    )
    months = retention_months or max(
        header.get("retention_months", 0), DEFAULT_RETENTION_MONTHS
    )
    now = datetime.datetime.now(datetime.UTC)
    if "export_time" in header:
        now = min(now, parse_time(header["export_time"]))
    expected_seq = last_removed_seq + 1
    expected_prev = start_hash(last_removed_seq, signed, problems, months, now)

    # Steps 5 and 7: walk the entries in seq order, one run of entries
    # with the same seq at a time, and count the unsigned ones.
    runs = [
        list(run)
        for _, run in itertools.groupby(entries, key=lambda e: e["seq"])
    ]
    newest_signed = max(signed, default=0)
    unsigned_entries = 0
    unsigned_since = None
    recomputed = {}
    first_seq = runs[0][0]["seq"] if runs else 0
    last_seq = 0
    for number, run in enumerate(runs):
        seq = run[0]["seq"]
        if seq < expected_seq:
            for entry in run:
                message = (
                    f"entry {entry['event_id']} repeats seq {seq}, after "
                    f"seq {expected_seq - 1}"
                )
                problems.append(
                    problem("inserted", seq, message, entry["event_id"])
                )
            continue
        hashes = [entry_hash(entry) for entry in run]
        genuine = 0
        if len(run) > 1:
            genuine, certain = genuine_index(
                run,
                hashes,
                expected_prev if seq == expected_seq else None,
                runs[number + 1] if number + 1 < len(runs) else [],
                signed.get(seq),
            )
            problems += repeat_problems(run, genuine, certain)
        entry, actual = run[genuine], hashes[genuine]
        event_id = entry["event_id"]
        if seq > newest_signed:
            unsigned_entries += 1
            # Times in the export's fixed-width UTC form sort as text.
            if unsigned_since is None or entry["time"] < unsigned_since:
                unsigned_since = entry["time"]
        if seq > expected_seq:
            missing = (
                f"seq {expected_seq}"
                if seq == expected_seq + 1
                else f"seq {expected_seq} to {seq - 1}"
            )
            message = f"entries {missing} are missing before entry {event_id}"
            problems.append(
                problem("deleted", expected_seq, message, event_id)
            )
        elif expected_prev is not None and entry["prev_hash"] != expected_prev:
            message = (
                f"entry {event_id} at seq {seq} does not link to the entry "
                "before it"
            )
            problems.append(problem("inserted", seq, message, event_id))
        if actual != entry["hash"]:
            message = (
                f"entry {event_id} at seq {seq} was altered: its fields do "
                "not match its hash"
            )
            problems.append(problem("altered", seq, message, event_id))
        recomputed[seq] = actual
        expected_prev = entry["hash"]
        expected_seq = seq + 1
        last_seq = seq

    # Step 6: a trusted checkpoint past the last entry proves that newer
    # entries existed, and each checkpoint must match the recomputed hash.
    # With no entry left after a retention cut, the chain ends at the cut.
    chain_end = max(last_seq, last_removed_seq)
    beyond = [seq for seq in signed if seq > chain_end]
    if beyond:
        newest = signed[max(beyond)]
        message = (
            f"entries after seq {chain_end} are missing: a checkpoint signed "
            f"on {newest['issue_time']} covers seq {newest['seq']}"
        )
        problems.append(problem("deleted", chain_end + 1, message))
    for seq, point in signed.items():
        if seq in recomputed and recomputed[seq] != point["hash"]:
            message = (
                f"the chain up to seq {seq} differs from its signed checkpoint"
            )
            problems.append(problem("altered", seq, message))
    # A stable sort: at one seq, problems keep the order they were found in.
    problems.sort(key=lambda found: found["seq"])

    result = {
        "chainId": chain_id,
        "intact": not problems,
        "entriesChecked": len(entries),
        "checkpointsChecked": len(checkpoints) + len(earlier_checkpoints),
        "firstSeq": first_seq,
        "lastSeq": last_seq,
        "problems": problems,
        "unsignedEntries": unsigned_entries,
        "retentionMonths": months,
    }
    if unsigned_since is not None:
        result["unsignedSince"] = unsigned_since

    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Verify a file from GET /v1/audit:export offline. "
        "Exit code 0: intact; 3: not intact; 2: a file is unreadable."
    )
    parser.add_argument("export", help="the NDJSON export to verify")
    parser.add_argument(
        "--public-key",
        action="append",
        required=True,
        help="a PEM file of an Ed25519 checkpoint-signing key you trust; "
        "repeat for each key the operator has used",
    )
    parser.add_argument(
        "--earlier-export",
        action="append",
        default=[],
        help="an export of the same chain that you kept from before; its "
        "checkpoints must still match; repeat for several",
    )
    parser.add_argument(
        "--retention-months",
        type=int,
        help="whole months before the current one that the operator's "
        "retention job keeps (ARXIO_AUDIT_RETENTION_MONTHS); a retention "
        "cut in a month that they still keep is a problem. Default: the "
        "longer of the export's retention_months and 12",
    )
    args = parser.parse_args(argv)
    if args.retention_months is not None and not (
        1 <= args.retention_months <= MAX_RETENTION_MONTHS
    ):
        parser.error(
            f"--retention-months {args.retention_months}: must be 1 to "
            f"{MAX_RETENTION_MONTHS}"
        )
    try:
        keys = load_trusted_keys(args.public_key)
        header, entries, checkpoints = read_export(args.export)
        earlier_checkpoints = []
        for path in args.earlier_export:
            earlier_header, _, earlier = read_export(path)
            if earlier_header["chain_id"] != header["chain_id"]:
                raise InvalidInput(
                    f"{path} is an export of chain "
                    f"{earlier_header['chain_id']}, not "
                    f"{header['chain_id']}"
                )
            earlier_checkpoints += earlier
    except InvalidInput as error:
        print(f"verify_audit_export: {error}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    result = verify(
        header,
        entries,
        checkpoints,
        keys,
        earlier_checkpoints,
        args.retention_months,
    )
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if not result["intact"]:
        first = result["problems"][0]
        print(
            "verify_audit_export: the audit trail is not intact: "
            f"{first['kind']} at seq {first['seq']}: {first['message']}",
            file=sys.stderr,
        )
        return EXIT_NOT_INTACT

    return 0


if __name__ == "__main__":
    sys.exit(main())
