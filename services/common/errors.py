"""Reject RPCs with `google.rpc.Status` details the edge renders as JSON."""

from collections.abc import Iterable, Sequence
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.identity import request_id_of


class FieldViolation:
    """One invalid request field, named by its JSON path."""

    __slots__ = ("field", "description")

    def __init__(self, field: str, description: str) -> None:
        self.field = field
        self.description = description

    def __repr__(self) -> str:
        return f"FieldViolation({self.field!r}, {self.description!r})"


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)

    return packed


def build_status(
    code: grpc.StatusCode,
    message: str,
    request_id: str = "",
    violations: Sequence[FieldViolation] = (),
) -> status_pb2.Status:
    """Build a `google.rpc.Status` with field violations and the request id."""
    details = []
    if violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=violation.field, description=violation.description
                )
                for violation in violations
            ]
        )
        details.append(_pack(bad_request))
    if request_id:
        details.append(
            _pack(error_details_pb2.RequestInfo(request_id=request_id))
        )

    return status_pb2.Status(
        code=code.value[0], message=message, details=details
    )


async def abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    violations: Iterable[FieldViolation] = (),
) -> NoReturn:
    """End the RPC with `code`, a message and the edge's request id."""
    status = build_status(
        code, message, request_id_of(context), tuple(violations)
    )
    converted = rpc_status.to_status(status)
    await context.abort(
        converted.code, converted.details, converted.trailing_metadata
    )
    raise AssertionError("unreachable: context.abort raises")


async def abort_invalid(
    context: grpc.aio.ServicerContext, violations: Sequence[FieldViolation]
) -> NoReturn:
    """Reject a request whose fields break the API's limits."""
    fields = ", ".join(violation.field for violation in violations)
    await abort(
        context,
        grpc.StatusCode.INVALID_ARGUMENT,
        f"invalid request: fix the field(s) {fields}",
        violations,
    )


HTTP_STATUS_OF_CODE = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
    code_pb2.UNAUTHENTICATED: 401,
}
"""HTTP status of each gRPC code, as `google.rpc.Code` documents them."""
