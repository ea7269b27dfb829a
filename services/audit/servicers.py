"""The access-log receiver Envoy streams to, and the audit query API."""

import time
import uuid

import grpc
import structlog
from arxio.audit.v1 import audit_pb2, audit_pb2_grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import timestamp_pb2
from sqlalchemy.exc import SQLAlchemyError

from services.audit.entries import AuditRow, audit_row
from services.audit.store import AuditStore
from services.common import pagination
from services.common.errors import FieldViolation, abort, abort_invalid
from services.common.identity import caller_org_id

log = structlog.get_logger()

MAX_ACTION_LENGTH = 200


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):
    """Receive Envoy's access log and insert one row per request."""

    def __init__(self, store: AuditStore) -> None:
        self._store = store

    async def StreamAccessLogs(self, request_iterator, context):
        stream_id = uuid.uuid4().hex[:12]
        log.info("access_log.stream_opened", stream_id=stream_id)
        received = 0
        async for message in request_iterator:
            rows = [
                row
                for row in map(audit_row, message.http_logs.log_entry)
                if row is not None
            ]
            started = time.perf_counter()
            try:
                await self._store.insert(rows)
            except SQLAlchemyError as error:
                # Ending the stream makes Envoy reconnect; entries it sends
                # meanwhile are lost, which the audit design has to cover.
                log.error(
                    "access_log.insert_failed",
                    stream_id=stream_id,
                    rows=len(rows),
                    error=type(error).__name__,
                    sqlstate=getattr(error.orig, "sqlstate", None),
                )
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, "audit database unavailable"
                )
            received += len(rows)
            log.info(
                "access_log.batch_inserted",
                stream_id=stream_id,
                rows=len(rows),
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            )
        log.info(
            "access_log.stream_closed", stream_id=stream_id, rows=received
        )

        return als_pb2.StreamAccessLogsResponse()


def event_message(row: AuditRow) -> audit_pb2.AuditEvent:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(row.time)
    event = audit_pb2.AuditEvent(
        event_id=str(row.event_id),
        time=stamp,
        org_id=row.org_id or "",
        key_id=row.key_id or "",
        action=row.action,
        resource_type=row.resource_type,
        method=row.method,
        endpoint=row.endpoint,
        status_code=row.status_code,
        response_time_ms=row.response_time_ms,
        request_id=row.request_id,
        client_address=row.client_address,
    )
    if row.grpc_status is not None:
        event.grpc_status = row.grpc_status

    return event


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, store: AuditStore) -> None:
        self._store = store

    async def ListAuditEvents(self, request, context):
        org_id = caller_org_id(context)
        try:
            uuid.UUID(org_id)
        except ValueError:
            await abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "no organization on the request: call through the edge",
            )
        violations = []
        try:
            size = pagination.page_size(request.page_size)
        except ValueError as error:
            violations.append(FieldViolation("pageSize", str(error)))
        try:
            before = pagination.decode_token(request.page_token)
        except pagination.InvalidPageToken as error:
            violations.append(FieldViolation("pageToken", str(error)))
        if len(request.action) > MAX_ACTION_LENGTH:
            violations.append(
                FieldViolation(
                    "action", f"at most {MAX_ACTION_LENGTH} characters"
                )
            )
        if violations:
            await abort_invalid(context, violations)

        rows = await self._store.list_events(
            org_id, size + 1, before, request.action
        )
        response = audit_pb2.ListAuditEventsResponse(
            audit_events=[event_message(row) for row in rows[:size]]
        )
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = pagination.encode_token(
                last.time, str(last.event_id)
            )

        return response
