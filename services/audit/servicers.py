"""The audit query API: list, read, verify and export an organization's
trail, and the operator's verification of any chain."""

import datetime
import json
import uuid
from collections.abc import Mapping

import grpc
from arxio.audit.v1 import audit_pb2, audit_pb2_grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PublicKey,
)
from google.api import httpbody_pb2
from google.protobuf import timestamp_pb2

from services.audit import chain
from services.audit.checkpoints import Checkpointer, anchor_problems
from services.audit.store import AuditStore, EventFilter
from services.common import pagination, time_fields
from services.common.errors import FieldViolation, abort, abort_invalid
from services.common.identity import (
    PRINCIPAL_HEADER,
    caller_org_id,
    metadata_value,
)

MAX_ACTION_LENGTH = 200
MAX_KEY_ID_LENGTH = 64
NDJSON = "application/x-ndjson"
# Entries per chunk of an export stream.
EXPORT_CHUNK = 500


def event_message(entry: chain.Entry) -> audit_pb2.AuditEvent:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(entry.time)
    event = audit_pb2.AuditEvent(
        event_id=str(entry.event_id),
        time=stamp,
        org_id=entry.org_id or "",
        key_id=entry.key_id or "",
        action=entry.action,
        resource_type=entry.resource_type,
        method=entry.method,
        endpoint=entry.endpoint,
        status_code=entry.status_code,
        response_time_ms=entry.response_time_ms,
        request_id=entry.request_id,
        client_address=entry.client_address,
    )
    if entry.grpc_status is not None:
        event.grpc_status = entry.grpc_status

    return event


def verification_message(
    result: chain.Verification,
) -> audit_pb2.AuditVerification:
    message = audit_pb2.AuditVerification(
        chain_id=str(result.chain_id),
        intact=result.intact,
        entries_checked=result.entries_checked,
        checkpoints_checked=result.checkpoints_checked,
        first_seq=result.first_seq,
        last_seq=result.last_seq,
        problems=[
            audit_pb2.AuditVerification.Problem(
                kind=problem.kind,
                seq=problem.seq,
                event_id=problem.event_id,
                message=problem.message,
            )
            for problem in result.problems
        ],
        unsigned_entries=result.unsigned_entries,
    )
    if result.unsigned_since is not None:
        message.unsigned_since.FromDatetime(result.unsigned_since)

    return message


def public_key_lines(keys: Mapping[str, Ed25519PublicKey]) -> list[dict]:
    return [
        {
            "type": "public_key",
            "public_key_id": key_id,
            "pem": key.public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            ).decode(),
        }
        for key_id, key in sorted(keys.items())
    ]


async def verify_stored_chain(
    store: AuditStore,
    chain_id: uuid.UUID,
    keys: Mapping[str, Ed25519PublicKey],
    retention_months: int = chain.DEFAULT_RETENTION_MONTHS,
    checkpointer: Checkpointer | None = None,
) -> chain.Verification:
    """Verify a stored chain. A retention cut must be at the end of a
    month that `retention_months` no longer keep.

    With `checkpointer`, the stored checkpoints are also compared with the
    chain's anchor, so checkpoints that a database superuser deleted or
    changed are reported even when the rest of the chain is consistent.
    """
    # The anchor before the checkpoints: a checkpoint is stored before it
    # is remembered, so the database has every anchor read here.
    anchor = checkpointer.anchor(chain_id) if checkpointer else None
    anchor_file_empty = checkpointer is not None and (
        checkpointer.anchor_file_empty
    )
    # Checkpoints before entries: a checkpoint signed while the entries
    # are read would cover entries this read missed, which would look
    # deleted. Every entry a checkpoint covers was stored before it.
    last_removed_seq = await store.last_removed_seq(chain_id)
    checkpoints = await store.checkpoints(chain_id)
    entries = [entry async for entry in store.chain_entries(chain_id)]

    result = chain.verify_chain(
        chain_id,
        entries,
        checkpoints,
        keys,
        last_removed_seq=last_removed_seq,
        retention_months=retention_months,
    )
    if checkpointer is not None:
        result.problems += anchor_problems(
            anchor, anchor_file_empty, checkpoints, keys
        )
        result.problems.sort(key=lambda problem: problem.seq)

    return result


async def _caller(context) -> str:
    org_id = caller_org_id(context)
    try:
        uuid.UUID(org_id)
    except ValueError:
        await abort(
            context,
            grpc.StatusCode.UNAUTHENTICATED,
            "no organization on the request: call through the edge",
        )

    return org_id


async def _filters(context, request) -> EventFilter:
    violations = []
    for field, value in (
        ("action", request.action),
        ("keyId", request.key_id),
    ):
        if "\x00" in value:
            violations.append(
                FieldViolation(field, "must not contain the NUL character")
            )
    if len(request.action) > MAX_ACTION_LENGTH:
        violations.append(
            FieldViolation("action", f"at most {MAX_ACTION_LENGTH} characters")
        )
    if len(request.key_id) > MAX_KEY_ID_LENGTH:
        violations.append(
            FieldViolation("keyId", f"at most {MAX_KEY_ID_LENGTH} characters")
        )
    if request.status_code and not 100 <= request.status_code <= 599:
        violations.append(
            FieldViolation(
                "statusCode",
                "must be an HTTP status, 100 to 599",
            )
        )
    start = end = None
    if request.HasField("start_time"):
        try:
            start = time_fields.to_datetime(request.start_time)
        except ValueError as error:
            violations.append(FieldViolation("startTime", str(error)))
    if request.HasField("end_time"):
        try:
            end = time_fields.to_datetime(request.end_time)
        except ValueError as error:
            violations.append(FieldViolation("endTime", str(error)))
    if start is not None and end is not None and start >= end:
        violations.append(
            FieldViolation("endTime", "must be later than startTime")
        )
    if violations:
        await abort_invalid(context, violations)

    return EventFilter(
        start_time=start,
        end_time=end,
        action=request.action,
        status_code=request.status_code,
        key_id=request.key_id,
    )


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(
        self,
        store: AuditStore,
        keys: Mapping[str, Ed25519PublicKey],
        retention_months: int = chain.DEFAULT_RETENTION_MONTHS,
        checkpointer: Checkpointer | None = None,
    ) -> None:
        self._store = store
        self._keys = keys
        self._retention_months = retention_months
        # The anchors that verification compares the checkpoints with.
        self._checkpointer = checkpointer

    async def ListAuditEvents(self, request, context):
        org_id = await _caller(context)
        violations = []
        try:
            size = pagination.page_size(request.page_size)
        except ValueError as error:
            violations.append(FieldViolation("pageSize", str(error)))
        try:
            before = pagination.decode_token(
                request.page_token, identifier_is_uuid=True
            )
        except pagination.InvalidPageToken as error:
            violations.append(FieldViolation("pageToken", str(error)))
        if violations:
            await abort_invalid(context, violations)
        filters = await _filters(context, request)

        entries = await self._store.list_events(
            org_id, size + 1, before, filters
        )
        response = audit_pb2.ListAuditEventsResponse(
            audit_events=[event_message(entry) for entry in entries[:size]]
        )
        if len(entries) > size:
            last = entries[size - 1]
            response.next_page_token = pagination.encode_token(
                last.time, str(last.event_id)
            )

        return response

    async def GetAuditEvent(self, request, context):
        org_id = await _caller(context)
        try:
            event_id = uuid.UUID(request.event_id)
        except ValueError:
            # Not echoed: the id may be thousands of characters long.
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                "audit event not found: event ids are UUIDs, as GET "
                "/v1/audit lists them",
            )
        entry = await self._store.get_event(org_id, event_id)
        if entry is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"audit event {event_id} not found in this organization",
            )

        return event_message(entry)

    async def VerifyAuditTrail(self, request, context):
        org_id = await _caller(context)
        result = await verify_stored_chain(
            self._store,
            uuid.UUID(org_id),
            self._keys,
            self._retention_months,
            self._checkpointer,
        )

        return verification_message(result)

    async def ExportAuditTrail(self, request, context):
        org_id = await _caller(context)
        chain_id = uuid.UUID(org_id)
        lines: list[str] = []
        header = {
            "type": "export",
            "chain_id": org_id,
            "last_removed_seq": await self._store.last_removed_seq(chain_id),
            # What an offline verifier checks a retention cut against.
            "retention_months": self._retention_months,
            "export_time": chain.utc_text(datetime.datetime.now(datetime.UTC)),
        }
        lines.append(json.dumps(header))
        # Read before the entries, as verify_stored_chain does.
        checkpoints = await self._store.checkpoints(chain_id)
        async for entry in self._store.chain_entries(chain_id):
            lines.append(json.dumps({"type": "entry", **entry.to_json()}))
            if len(lines) >= EXPORT_CHUNK:
                yield _ndjson(lines)
                lines = []
        for point in checkpoints:
            lines.append(json.dumps({"type": "checkpoint", **point.to_json()}))
        lines += [json.dumps(line) for line in public_key_lines(self._keys)]
        yield _ndjson(lines)


def _ndjson(lines: list[str]) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(
        content_type=NDJSON, data=("\n".join(lines) + "\n").encode()
    )


class AuditOperatorServicer(audit_pb2_grpc.AuditOperatorServiceServicer):
    def __init__(
        self,
        store: AuditStore,
        keys: Mapping[str, Ed25519PublicKey],
        retention_months: int = chain.DEFAULT_RETENTION_MONTHS,
        checkpointer: Checkpointer | None = None,
    ) -> None:
        self._store = store
        self._keys = keys
        self._retention_months = retention_months
        # The anchors that verification compares the checkpoints with.
        self._checkpointer = checkpointer

    async def VerifyOrganizationAuditTrail(self, request, context):
        if metadata_value(context, PRINCIPAL_HEADER) != "operator":
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "operator credential required",
            )
        try:
            chain_id = uuid.UUID(request.org_id)
        except ValueError:
            await abort_invalid(
                context, [FieldViolation("orgId", "must be a UUID")]
            )
        result = await verify_stored_chain(
            self._store,
            chain_id,
            self._keys,
            self._retention_months,
            self._checkpointer,
        )

        return verification_message(result)
