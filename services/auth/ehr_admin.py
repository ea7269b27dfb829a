"""The operator API of EHR issuers and CDS Hooks settings."""

import ipaddress
import re
import urllib.parse

import grpc
import structlog
from arxio.auth.v1 import ehr_pb2, ehr_pb2_grpc
from google.protobuf import duration_pb2, timestamp_pb2

from services.auth.admin import valid_uuid
from services.auth.ehr_store import EhrIssuerRow, EhrStore, IssuerTaken
from services.auth.store import AuthStore
from services.common import time_fields
from services.common.errors import FieldViolation, abort, abort_invalid
from services.common.identity import PRINCIPAL_HEADER, metadata_value

log = structlog.get_logger()

MAX_ISSUER_LENGTH = 500
MAX_URL_LENGTH = 2000
MIN_MODEL_TIMEOUT_MS = 100
MAX_MODEL_TIMEOUT_MS = 10_000


def issuer_message(row: EhrIssuerRow) -> ehr_pb2.EhrIssuer:
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(row.create_time)

    return ehr_pb2.EhrIssuer(
        issuer_id=row.issuer_id,
        org_id=row.org_id,
        issuer=row.issuer,
        jwks_url=row.jwks_url,
        create_time=created,
    )


def jwks_url_violations(url: str) -> list[FieldViolation]:
    """Accept only absolute https URLs with a host and no credentials."""
    if len(url) > MAX_URL_LENGTH:
        return [
            FieldViolation(
                "jwksUrl", f"must be at most {MAX_URL_LENGTH} characters"
            )
        ]
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return [
            FieldViolation(
                "jwksUrl",
                "must be an https URL such as "
                "https://ehr.example.org/.well-known/jwks.json",
            )
        ]
    if parts.username or parts.password or parts.fragment:
        return [
            FieldViolation(
                "jwksUrl", "must not carry credentials or a fragment"
            )
        ]
    host = parts.hostname
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        # Forms such as 2852039166 or 0251.0376.0251.0376 are addresses to
        # the resolver though not to ipaddress: accept only names here.
        if _NUMERIC_HOST.fullmatch(host):
            return [
                FieldViolation(
                    "jwksUrl",
                    "write an address host as a plain dotted quad or IPv6",
                )
            ]
        return []
    if unusable_address(address):
        return [
            FieldViolation(
                "jwksUrl", f"host {address} is not a usable server address"
            )
        ]

    return []


# Hosts of numbers only, decimal, octal or 0x-hex, joined by dots.
_NUMERIC_HOST = re.compile(
    r"(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+))*\.?", re.IGNORECASE
)


def unusable_address(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> bool:
    """Tell whether a JWK Set may not be fetched from an address: link-local
    (cloud metadata services among them), multicast or unspecified, also
    when written as an IPv4-mapped IPv6 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped

    return (
        address.is_link_local or address.is_multicast or address.is_unspecified
    )


class EhrAccessServicer(ehr_pb2_grpc.EhrAccessServiceServicer):
    def __init__(self, store: AuthStore, ehr_store: EhrStore) -> None:
        self._store = store
        self._ehr_store = ehr_store

    async def _organization(self, context, org_id: str) -> str:
        # The edge sets the principal only after checking the operator
        # token.
        if metadata_value(context, PRINCIPAL_HEADER) != "operator":
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "operator credential required",
            )
        if not valid_uuid(org_id):
            await abort_invalid(
                context, [FieldViolation("orgId", "must be a UUID")]
            )
        if await self._store.get_organization(org_id) is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"organization {org_id} not found",
            )

        return org_id

    async def RegisterEhrIssuer(self, request, context):
        org_id = await self._organization(context, request.org_id)
        issuer = request.issuer.strip()
        violations = jwks_url_violations(request.jwks_url.strip())
        if not issuer or len(issuer) > MAX_ISSUER_LENGTH:
            violations.append(
                FieldViolation(
                    "issuer",
                    f"must be 1 to {MAX_ISSUER_LENGTH} characters: the "
                    "EHR's JWT iss value",
                )
            )
        if violations:
            await abort_invalid(context, violations)
        try:
            row = await self._ehr_store.insert_issuer(
                org_id, issuer, request.jwks_url.strip()
            )
        except IssuerTaken:
            await abort(
                context,
                grpc.StatusCode.ALREADY_EXISTS,
                f"issuer {issuer[:200]!r} is already registered: an issuer "
                "authenticates one organization; delete it first to move it",
            )
        log.info(
            "auth.ehr_issuer_registered",
            org_id=org_id,
            issuer_id=row.issuer_id,
        )

        return issuer_message(row)

    async def ListEhrIssuers(self, request, context):
        org_id = await self._organization(context, request.org_id)
        rows = await self._ehr_store.list_issuers(org_id)

        return ehr_pb2.ListEhrIssuersResponse(
            ehr_issuers=[issuer_message(row) for row in rows]
        )

    async def DeleteEhrIssuer(self, request, context):
        org_id = await self._organization(context, request.org_id)
        if not valid_uuid(request.issuer_id):
            # Not echoed: the id may be thousands of characters long.
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                "EHR issuer not found: issuer ids are UUIDs, as `arxio "
                "ehr list --org ORG_ID` shows them",
            )
        row = await self._ehr_store.delete_issuer(org_id, request.issuer_id)
        if row is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"EHR issuer {request.issuer_id} not found in "
                f"organization {org_id}",
            )
        log.info(
            "auth.ehr_issuer_deleted", org_id=org_id, issuer_id=row.issuer_id
        )

        return issuer_message(row)

    async def SetCdsHooksSettings(self, request, context):
        org_id = await self._organization(context, request.org_id)
        timeout_ms = None
        if request.HasField("model_review_timeout"):
            try:
                timeout = time_fields.to_timedelta(
                    request.model_review_timeout
                )
            except ValueError as error:
                await abort_invalid(
                    context,
                    [FieldViolation("modelReviewTimeout", str(error))],
                )
            timeout_ms = round(timeout.total_seconds() * 1000)
            if timeout_ms == 0:
                timeout_ms = None
            elif (
                not MIN_MODEL_TIMEOUT_MS <= timeout_ms <= MAX_MODEL_TIMEOUT_MS
            ):
                await abort_invalid(
                    context,
                    [
                        FieldViolation(
                            "modelReviewTimeout",
                            "must be 0s (off) or 0.1s to 10s",
                        )
                    ],
                )
        await self._ehr_store.set_model_review_timeout_ms(org_id, timeout_ms)
        log.info(
            "auth.cds_hooks_settings_set",
            org_id=org_id,
            model_review_timeout_ms=timeout_ms or 0,
        )
        settings = ehr_pb2.CdsHooksSettings(org_id=org_id)
        if timeout_ms:
            settings.model_review_timeout.CopyFrom(
                duration_pb2.Duration(
                    seconds=timeout_ms // 1000,
                    nanos=(timeout_ms % 1000) * 1_000_000,
                )
            )

        return settings
