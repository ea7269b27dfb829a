"""The auth decision Envoy asks for on every request (ext_authz).

Order of checks: no credential may travel in the URL; the URL must decode
to UTF-8 without NUL, and every header must fit in gRPC metadata; the RPC
must exist; operator methods need the operator token; every other method
needs a well-formed, known, unexpired key, then an active organization, a
client address inside its IP allowlist if it has one, room in the daily
quota, a body within the edge's limit, the method's scope and a body that
fits the RPC's message type.
Every request whose key is known counts toward its organization's daily
quota, even when a later check denies it; requests rejected before the key
is known count for no organization.
"""

import datetime
import hashlib
import ipaddress
import json
import re
import secrets
import urllib.parse
from dataclasses import dataclass, field

import grpc
import structlog
from google.protobuf import json_format
from google.rpc import status_pb2

from services.auth import keys
from services.auth.credential_cache import CredentialCache
from services.auth.ehr_tokens import (
    EhrTokenVerifier,
    JwksUnavailable,
    TokenRejected,
)
from services.auth.quota import QuotaCounter
from services.auth.store import AuthStore, Credential, IPNetwork
from services.common import methods, metrics, strict_body
from services.common.edge_replies import (
    LOCAL_REPLY_MESSAGES,
    MAX_REQUEST_BYTES,
)
from services.common.errors import (
    HTTP_STATUS_OF_CODE,
    FieldViolation,
    build_status,
)
from services.common.identity import (
    CLIENT_ADDRESS_HEADER,
    HOOKS_MODEL_TIMEOUT_HEADER,
    KEY_ID_HEADER,
    ORG_ID_HEADER,
    PRINCIPAL_HEADER,
    SCOPES_HEADER,
)
from services.common.plans import plan_limits

log = structlog.get_logger()

# Query parameters that carry a credential when a client puts one in a URL.
_CREDENTIAL_PARAMETERS = frozenset(
    {
        "api_key",
        "apikey",
        "api-key",
        "key",
        "x-api-key",
        "token",
        "access_token",
        "authorization",
    }
)
# The prefixes of API keys and of the operator token.
_CREDENTIAL_PREFIXES = (keys.PREFIX, keys.OPERATOR_TOKEN_PREFIX)
API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"
# Headers the auth decision owns: a client's own values never pass.
IDENTITY_HEADERS = (
    ORG_ID_HEADER,
    KEY_ID_HEADER,
    SCOPES_HEADER,
    PRINCIPAL_HEADER,
    HOOKS_MODEL_TIMEOUT_HEADER,
)


@dataclass
class Decision:
    """Outcome of one check, independent of Envoy's message types."""

    allowed: bool
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    # Headers set on the request towards the service (allowed only).
    upstream_headers: dict[str, str] = field(default_factory=dict)
    # Headers added to the response to the client.
    response_headers: dict[str, str] = field(default_factory=dict)
    # What the audit trail records of the decision.
    metadata: dict[str, str] = field(default_factory=dict)
    # The invalid fields of a request denied as INVALID_ARGUMENT.
    violations: list[FieldViolation] = field(default_factory=list)
    # The HTTP status of a denial that the code's usual one does not fit,
    # such as 413 for a body over the limit.
    http_status_code: int | None = None

    @property
    def http_status(self) -> int:
        if self.http_status_code is not None:
            return self.http_status_code

        return HTTP_STATUS_OF_CODE[self.code.value[0]]


@dataclass(frozen=True)
class RequestFacts:
    """What the decision reads of an incoming request."""

    http_method: str
    path: str
    headers: dict[str, str]
    request_id: str
    # The request body as the edge buffered it: at most MAX_REQUEST_BYTES
    # and one byte more, which marks a body over the limit.
    body: bytes = b""


def next_utc_midnight(now: datetime.datetime) -> datetime.datetime:
    tomorrow = now.date() + datetime.timedelta(days=1)

    return datetime.datetime.combine(
        tomorrow, datetime.time(), tzinfo=datetime.UTC
    )


def _rate_limit_headers(
    limit: int | None, used: int, reset: datetime.datetime
) -> dict[str, str]:
    if limit is None:
        return {
            "x-ratelimit-limit": "unlimited",
            "x-ratelimit-remaining": "unlimited",
            "x-ratelimit-reset": str(int(reset.timestamp())),
        }

    return {
        "x-ratelimit-limit": str(limit),
        "x-ratelimit-remaining": str(max(limit - used, 0)),
        "x-ratelimit-reset": str(int(reset.timestamp())),
    }


def _credential_in_url(path: str) -> bool:
    """Tell whether a URL carries an API key or the operator token.

    A key pasted into a path (`DELETE /v1/keys/arx_...`) would be echoed in
    error messages and logs just as one in the query string.
    """
    decoded = urllib.parse.unquote(path)
    if any(prefix in decoded for prefix in _CREDENTIAL_PREFIXES):
        return True
    _, _, query = path.partition("?")
    for name, _ in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name.lower() in _CREDENTIAL_PARAMETERS:
            return True

    return False


def _url_problem(path: str) -> str | None:
    """Return why a URL's percent-encoded bytes cannot reach a service.

    The transcoder copies path and query values into string fields. A gRPC
    server fails a message whose string is not UTF-8 with an internal
    error, and PostgreSQL text cannot hold the NUL character.
    """
    try:
        decoded = urllib.parse.unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        return "its percent-encoded bytes are not UTF-8"
    if "\x00" in decoded:
        return "it contains the NUL character (%00)"

    return None


# The characters gRPC metadata allows in a header name, and in the value of
# a name without the -bin suffix (printable ASCII). A gRPC server fails a
# call whose metadata has others with INTERNAL, not a client error.
_METADATA_NAME = re.compile(r"^[0-9a-z_.-]+$")
_METADATA_VALUE = re.compile(r"^[\x20-\x7e]*$")


# gRPC's grammar of a deadline (up to 8 digits and a unit) and of a binary
# header's values (base64, joined by commas when repeated). A server fails
# a call that breaks either with INTERNAL.
_GRPC_TIMEOUT = re.compile(r"^[0-9]{1,8}[HMSmun]$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}(,[A-Za-z0-9+/]*={0,2})*$")


def _invalid_header(headers: dict[str, str]) -> tuple[str, str] | None:
    """Return the first header that cannot travel as gRPC metadata, and
    what its value must look like."""
    for name, value in headers.items():
        if name.startswith(":"):
            continue
        if not _METADATA_NAME.match(name):
            return name, ("names may contain only a-z, 0-9, '-', '_' and '.'")
        if name.endswith("-bin"):
            if not _BASE64.match(value):
                return name, "a -bin header's value must be base64"
        elif not _METADATA_VALUE.match(value):
            return name, "values may contain only printable ASCII"
        elif name == "grpc-timeout" and not _GRPC_TIMEOUT.match(value):
            return name, (
                "grpc-timeout must be up to 8 digits and a unit "
                "(H, M, S, m, u or n)"
            )

    return None


def _address_allowed(address: str, allowlist: tuple[IPNetwork, ...]) -> bool:
    """Tell whether a client address falls in any range of an allowlist."""
    try:
        client = ipaddress.ip_address(address.strip())
    except ValueError:
        # No address the edge vouches for: fail closed.
        return False
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped:
        client = client.ipv4_mapped

    return any(client in network for network in allowlist)


def _size_denial(facts: RequestFacts, audit: dict) -> Decision | None:
    """Deny a body over the edge's limit with 413.

    The edge sends the decision at most MAX_REQUEST_BYTES + 1 bytes of a
    body, so a longer one arrives cut to that length. The decision, not
    Envoy's buffer filter, rejects it, so that the audit trail files the
    413 under the key's organization.
    """
    if len(facts.body) <= MAX_REQUEST_BYTES:
        return None
    # gRPC reports a message over a receiver's limit as RESOURCE_EXHAUSTED.
    # A REST caller gets the code of the edge's other 413 replies.
    if facts.headers.get("content-type", "").startswith("application/grpc"):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    else:
        code = grpc.StatusCode.INVALID_ARGUMENT
    decision = _deny(code, LOCAL_REPLY_MESSAGES[413], **audit)
    decision.http_status_code = 413

    return decision


def _body_denial(
    facts: RequestFacts, method: methods.Method, audit: dict
) -> Decision | None:
    """Deny a request whose body does not fit its RPC's message type."""
    if method.input_type is None or not facts.body:
        return None
    if facts.headers.get("content-type", "").startswith("application/grpc"):
        try:
            violations = strict_body.check_grpc_body(
                facts.body,
                method.input_type,
                facts.headers.get("grpc-encoding", ""),
            )
        except strict_body.MessageTooLarge as error:
            return _deny(
                grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), **audit
            )
    elif method.http is not None and method.http.body:
        violations = strict_body.check_json_body(
            facts.body, method.input_type, method.http.body
        )
    else:
        return None
    if not violations:
        return None
    fields = ", ".join(violation.field for violation in violations[:10])
    decision = _deny(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"invalid request: fix the field(s) {fields}",
        **audit,
    )
    decision.violations = violations

    return decision


def _organization_denial(
    facts: RequestFacts, credential: Credential, identity: dict
) -> Decision | None:
    """Deny a suspended organization, or a client outside its allowlist."""
    if credential.org_state != "active":
        return _deny(
            grpc.StatusCode.PERMISSION_DENIED,
            f"organization {credential.org_id} is suspended: "
            "contact the operator of this deployment",
            **identity,
        )
    address = facts.headers.get(CLIENT_ADDRESS_HEADER, "")
    if credential.ip_allowlist and not _address_allowed(
        address, credential.ip_allowlist
    ):
        return _deny(
            grpc.StatusCode.PERMISSION_DENIED,
            f"client address {address[:64] or '?'} is outside the IP "
            f"allowlist of organization {credential.org_id}: call from "
            "an allowed network or ask the operator to extend the list",
            **identity,
        )

    return None


def _scope_denial(
    method: methods.Method, credential: Credential, identity: dict
) -> Decision | None:
    if method.scope in credential.scopes:
        return None

    return _deny(
        grpc.StatusCode.PERMISSION_DENIED,
        f"API key {credential.key_id} lacks the scope "
        f"{method.scope} that {method.action} needs",
        **identity,
    )


def _deny(code: grpc.StatusCode, message: str, **metadata: str) -> Decision:
    return Decision(False, code, message, metadata=metadata)


class AuthDecider:
    def __init__(
        self,
        store: AuthStore,
        quota: QuotaCounter,
        operator_token_sha256: bytes,
        clock=lambda: datetime.datetime.now(datetime.UTC),
        cache: CredentialCache | None = None,
        ehr_tokens: EhrTokenVerifier | None = None,
    ) -> None:
        self._store = store
        self._quota = quota
        self._cache = cache
        # None in tests that need no CDS Hooks: API keys only, and hooks
        # calls get no model review.
        self._ehr_tokens = ehr_tokens
        self._operator_token_sha256 = operator_token_sha256
        self._clock = clock

    async def decide(self, facts: RequestFacts) -> Decision:
        if _credential_in_url(facts.path):
            return _deny(
                grpc.StatusCode.INVALID_ARGUMENT,
                "credentials are accepted only in the X-API-Key or "
                "Authorization header, never in the URL: a credential sent "
                "in a URL may be stored by proxies and browsers, so revoke "
                "it and create a new one",
            )
        url_problem = _url_problem(facts.path)
        if url_problem is not None:
            return _deny(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid URL: {url_problem}. Send path and query values "
                "as percent-encoded UTF-8 text",
            )
        invalid_header = _invalid_header(facts.headers)
        if invalid_header is not None:
            name, rule = invalid_header
            return _deny(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid header {name[:64]!r}: {rule}",
            )
        method = methods.find_method(facts.http_method, facts.path)
        if method is None:
            return _deny(
                grpc.StatusCode.NOT_FOUND,
                f"no API method at {facts.http_method[:16]} "
                f"{facts.path.split('?', 1)[0][:128]}: see the API reference",
            )
        audit = {
            "action": method.action,
            "resource_type": method.resource_type,
        }
        if method.authentication == methods.Authentication.OPERATOR:
            return self._decide_operator(facts, method, audit)
        if method.authentication == methods.Authentication.CDS_HOOKS:
            return await self._decide_hooks(facts, method, audit)

        return await self._decide_key(facts, method, audit)

    def _decide_operator(
        self, facts: RequestFacts, method: methods.Method, audit: dict
    ) -> Decision:
        header = facts.headers.get(AUTHORIZATION_HEADER, "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing operator credential: send it as "
                "'Authorization: Bearer <token>'",
                **audit,
            )
        digest = hashlib.sha256(token.strip().encode()).digest()
        if not secrets.compare_digest(digest, self._operator_token_sha256):
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid operator credential",
                **audit,
            )

        denial = _size_denial(facts, audit) or _body_denial(
            facts, method, audit
        )
        if denial is not None:
            return denial

        return Decision(
            True,
            upstream_headers={PRINCIPAL_HEADER: "operator"},
            metadata={**audit, "principal": "operator"},
        )

    async def _decide_key(
        self, facts: RequestFacts, method: methods.Method, audit: dict
    ) -> Decision:
        presented = facts.headers.get(API_KEY_HEADER, "").strip()
        if not presented:
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing API key: send it in the X-API-Key header",
                **audit,
            )
        if not keys.is_well_formed(presented):
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid API key: check that it was copied whole",
                **audit,
            )
        credential = await self._find_credential(keys.key_hash(presented))
        if credential is None:
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid API key: it is unknown, revoked or expired",
                **audit,
            )
        identity = {
            **audit,
            "org_id": credential.org_id,
            "key_id": credential.key_id,
        }
        organization_denial = _organization_denial(facts, credential, identity)
        request_denial = None
        if organization_denial is None:
            request_denial = (
                _size_denial(facts, identity)
                or _scope_denial(method, credential, identity)
                or _body_denial(facts, method, identity)
            )

        return await self._count(
            credential, identity, organization_denial, request_denial
        )

    async def _decide_hooks(
        self, facts: RequestFacts, method: methods.Method, audit: dict
    ) -> Decision:
        """Authenticate a CDS Hooks call by API key or by an EHR's JWT."""
        scheme, _, token = facts.headers.get(
            AUTHORIZATION_HEADER, ""
        ).partition(" ")
        if facts.headers.get(API_KEY_HEADER, "").strip():
            decision = await self._decide_key(facts, method, audit)
        elif scheme.lower() == "bearer" and token.strip():
            decision = await self._decide_ehr_token(
                facts, method, audit, token.strip()
            )
        else:
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credential: send an API key in the X-API-Key "
                "header or a CDS Hooks JWT as 'Authorization: Bearer <jwt>'",
                **audit,
            )
        if decision.allowed and self._ehr_tokens is not None:
            timeout_ms = await self._ehr_tokens.store.model_review_timeout_ms(
                decision.upstream_headers[ORG_ID_HEADER]
            )
            decision.upstream_headers[HOOKS_MODEL_TIMEOUT_HEADER] = str(
                timeout_ms
            )

        return decision

    async def _decide_ehr_token(
        self,
        facts: RequestFacts,
        method: methods.Method,
        audit: dict,
        token: str,
    ) -> Decision:
        if self._ehr_tokens is None:
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                "CDS Hooks JWTs are not accepted by this deployment: use "
                "an API key",
                **audit,
            )
        path = facts.path.split("?", 1)[0]
        if method.http is None or not method.http.pattern.match(path):
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                "CDS Hooks JWTs are accepted on the REST routes under "
                "/cds-services only: native gRPC calls need an API key",
                **audit,
            )
        try:
            issuer = await self._ehr_tokens.verify(token, path)
        except TokenRejected as rejection:
            log.info(
                "auth.ehr_token_rejected",
                request_id=facts.request_id,
                reason=str(rejection)[:200],
            )
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                f"invalid CDS Hooks JWT: {rejection}",
                **audit,
            )
        except JwksUnavailable:
            return _deny(
                grpc.StatusCode.UNAVAILABLE,
                "the EHR's JWK Set could not be fetched to verify the JWT: "
                "retry shortly",
                **audit,
            )
        credential = issuer.credential
        identity = {
            **audit,
            "org_id": credential.org_id,
            "key_id": credential.key_id,
        }
        organization_denial = _organization_denial(facts, credential, identity)
        request_denial = None
        if organization_denial is None:
            request_denial = _scope_denial(method, credential, identity)
        decision = await self._count(
            credential, identity, organization_denial, request_denial
        )
        if decision.allowed:
            decision.upstream_headers[PRINCIPAL_HEADER] = "ehr_jwt"
            decision.metadata["principal"] = "ehr_jwt"

        return decision

    async def _find_credential(self, digest: bytes) -> Credential | None:
        if self._cache is not None:
            cached = self._cache.get(digest)
            if cached is not None:
                # An expiry time passes without a change to notify about.
                if cached.expire_time is None or cached.expire_time > (
                    self._clock()
                ):
                    return cached
        credential = await self._store.find_credential(digest)
        if credential is not None and self._cache is not None:
            self._cache.put(digest, credential)

        return credential

    async def _count(
        self,
        credential: Credential,
        identity: dict,
        organization_denial: Decision | None = None,
        request_denial: Decision | None = None,
    ) -> Decision:
        """Count a request of a known key against its organization's quota.

        A request that passed key authentication counts even when it is
        then denied, and its response carries the rate-limit headers, as
        every authenticated request's does. Over the quota the response is
        429 whatever is wrong with the request itself (`request_denial`),
        but a suspended organization or an address outside its allowlist
        (`organization_denial`) gets its 403 first.
        """
        now = self._clock()
        reset = next_utc_midnight(now)
        limit = plan_limits()[credential.plan].daily_request_limit
        used = await self._quota.count(credential.org_id, now.date(), limit)
        if organization_denial is not None:
            organization_denial.response_headers = _rate_limit_headers(
                limit, limit if used is None else used, reset
            )

            return organization_denial
        if used is None:
            metrics.QUOTA_DENIALS.inc()
            decision = _deny(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"daily request limit of {limit} reached for organization "
                f"{credential.org_id}: retry after 00:00 UTC or upgrade "
                "the plan",
                **identity,
            )
            decision.response_headers = _rate_limit_headers(
                limit, limit, reset
            )
            retry_after = max(int((reset - now).total_seconds()) + 1, 1)
            decision.response_headers["retry-after"] = str(retry_after)

            return decision
        if request_denial is not None:
            request_denial.response_headers = _rate_limit_headers(
                limit, used, reset
            )

            return request_denial

        return Decision(
            True,
            upstream_headers={
                ORG_ID_HEADER: credential.org_id,
                KEY_ID_HEADER: credential.key_id,
                SCOPES_HEADER: ",".join(sorted(credential.scopes)),
                PRINCIPAL_HEADER: "api_key",
            },
            response_headers=_rate_limit_headers(limit, used, reset),
            metadata=identity,
        )


def denial_status(decision: Decision, request_id: str) -> status_pb2.Status:
    """Return a denial as `google.rpc.Status`, with its details."""
    return build_status(
        decision.code, decision.message, request_id, decision.violations
    )


def error_body(decision: Decision, request_id: str) -> str:
    """Render a denial as the JSON form of `google.rpc.Status`."""
    return json.dumps(
        json_format.MessageToDict(denial_status(decision, request_id)),
        separators=(",", ":"),
    )
