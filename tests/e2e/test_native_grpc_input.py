"""Native gRPC inputs that JSON cannot carry, through the real edge.

The transcoder rejects an out-of-range time in a REST body, but a gRPC
client can send any Timestamp or Duration. It can also send an id of any
length, which a not-found message must not echo: a message over about
8 KiB of metadata makes the client fail with RESOURCE_EXHAUSTED instead
of the real status.
"""

import grpc
import pytest
from arxio.audit.v1 import audit_pb2, audit_pb2_grpc
from arxio.auth.v1 import ehr_pb2, ehr_pb2_grpc, keys_pb2, keys_pb2_grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.suite import Organization

pytestmark = pytest.mark.e2e

LONG_ID = "k" * 5000


@pytest.fixture(scope="module")
def org(stack) -> Organization:
    return Organization(stack, "enterprise")


def rpc_error(edge, stub_class, method: str, request, metadata):
    with edge.channel() as channel:
        call = getattr(stub_class(channel), method)
        with pytest.raises(grpc.RpcError) as raised:
            call(request, metadata=metadata, timeout=30)

    return raised.value


def violated_fields(error: grpc.RpcError) -> set[str]:
    status = rpc_status.from_call(error)
    assert status is not None, error.details()
    fields = set()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields |= {item.field for item in bad_request.field_violations}

    return fields


def key_metadata(org: Organization) -> list[tuple[str, str]]:
    return [("x-api-key", org.api_key)]


def operator_metadata(stack) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {stack.operator_token}")]


class TestTimeRanges:
    @pytest.mark.parametrize(
        ("seconds", "nanos"),
        [(2**62, 0), (4_102_444_800, -5), (253_402_300_800, 0)],
        ids=["seconds_2_62", "negative_nanos", "year_10000"],
    )
    def test_create_key_expiry_out_of_range(self, edge, org, seconds, nanos):
        request = keys_pb2.CreateKeyRequest(
            expire_time=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
        )

        error = rpc_error(
            edge,
            keys_pb2_grpc.KeyServiceStub,
            "CreateKey",
            request,
            key_metadata(org),
        )

        assert grpc.StatusCode.INVALID_ARGUMENT == error.code()
        assert {"expireTime"} == violated_fields(error)

    @pytest.mark.parametrize(
        ("seconds", "nanos"),
        [(2**62, 0), (60, -1), (-(2**62), 0)],
        ids=["seconds_2_62", "mixed_signs", "minus_2_62"],
    )
    def test_rotate_grace_out_of_range(self, edge, org, seconds, nanos):
        request = keys_pb2.RotateKeyRequest(
            key_id=org.key_id,
            grace_period=duration_pb2.Duration(seconds=seconds, nanos=nanos),
        )

        error = rpc_error(
            edge,
            keys_pb2_grpc.KeyServiceStub,
            "RotateKey",
            request,
            key_metadata(org),
        )

        assert grpc.StatusCode.INVALID_ARGUMENT == error.code()
        assert {"gracePeriod"} == violated_fields(error)

    @pytest.mark.parametrize(
        ("field", "json_name"),
        [("start_time", "startTime"), ("end_time", "endTime")],
    )
    def test_audit_filter_out_of_range(self, edge, org, field, json_name):
        request = audit_pb2.ListAuditEventsRequest(
            **{field: timestamp_pb2.Timestamp(seconds=2**62)}
        )

        error = rpc_error(
            edge,
            audit_pb2_grpc.AuditServiceStub,
            "ListAuditEvents",
            request,
            key_metadata(org),
        )

        assert grpc.StatusCode.INVALID_ARGUMENT == error.code()
        assert {json_name} == violated_fields(error)

    def test_hooks_timeout_out_of_range(self, stack, edge, org):
        request = ehr_pb2.SetCdsHooksSettingsRequest(
            org_id=org.org_id,
            model_review_timeout=duration_pb2.Duration(seconds=2**62),
        )

        error = rpc_error(
            edge,
            ehr_pb2_grpc.EhrAccessServiceStub,
            "SetCdsHooksSettings",
            request,
            operator_metadata(stack),
        )

        assert grpc.StatusCode.INVALID_ARGUMENT == error.code()
        assert {"modelReviewTimeout"} == violated_fields(error)


class TestLongIds:
    @pytest.mark.parametrize(
        ("stub_class", "method", "request_message", "message"),
        [
            (
                keys_pb2_grpc.KeyServiceStub,
                "RevokeKey",
                keys_pb2.RevokeKeyRequest(key_id=LONG_ID),
                "key not found: key ids are key_",
            ),
            (
                keys_pb2_grpc.KeyServiceStub,
                "RotateKey",
                keys_pb2.RotateKeyRequest(key_id=LONG_ID),
                "key not found: key ids are key_",
            ),
            (
                audit_pb2_grpc.AuditServiceStub,
                "GetAuditEvent",
                audit_pb2.GetAuditEventRequest(event_id=LONG_ID),
                "audit event not found: event ids are UUIDs",
            ),
        ],
        ids=["revoke_key", "rotate_key", "get_audit_event"],
    )
    def test_customer_id_not_echoed(
        self, edge, org, stub_class, method, request_message, message
    ):
        error = rpc_error(
            edge, stub_class, method, request_message, key_metadata(org)
        )

        assert grpc.StatusCode.NOT_FOUND == error.code()
        assert error.details().startswith(message)
        assert LONG_ID[:100] not in error.details()

    def test_issuer_id_not_echoed(self, stack, edge, org):
        request = ehr_pb2.DeleteEhrIssuerRequest(
            org_id=org.org_id, issuer_id=LONG_ID
        )

        error = rpc_error(
            edge,
            ehr_pb2_grpc.EhrAccessServiceStub,
            "DeleteEhrIssuer",
            request,
            operator_metadata(stack),
        )

        assert grpc.StatusCode.NOT_FOUND == error.code()
        assert error.details().startswith("EHR issuer not found: issuer ids")
        assert LONG_ID[:100] not in error.details()
