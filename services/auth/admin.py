"""Key management for an organization, operator administration, and the
internal account API that the billing service calls."""

import datetime
import ipaddress
import uuid

import grpc
import structlog
from arxio.auth.v1 import (
    keys_pb2,
    keys_pb2_grpc,
    operator_pb2,
    operator_pb2_grpc,
    organization_pb2,
)
from arxio.internal.v1 import accounts_pb2, accounts_pb2_grpc
from google.protobuf import timestamp_pb2

from services.auth import keys
from services.auth.store import AuthStore, KeyRow, OrganizationRow
from services.common import pagination, time_fields
from services.common.errors import FieldViolation, abort, abort_invalid
from services.common.identity import (
    KEY_ID_HEADER,
    PRINCIPAL_HEADER,
    SCOPES_HEADER,
    caller_org_id,
    metadata_value,
)
from services.common.plans import plan_name, plan_value

log = structlog.get_logger()
PLAN_VALUES = frozenset(
    value
    for value in organization_pb2.Organization.Plan.values()
    if value != organization_pb2.Organization.PLAN_UNSPECIFIED
)

Scope = keys_pb2.ApiKey.Scope
ALL_SCOPES = tuple(
    name for name in Scope.keys() if name != "SCOPE_UNSPECIFIED"
)
DEFAULT_GRACE = datetime.timedelta(hours=24)
MAX_GRACE = datetime.timedelta(days=7)
MAX_NAME_LENGTH = 200
MAX_ALLOWLIST_RANGES = 100


def _timestamp(value: datetime.datetime | None) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    if value is not None:
        stamp.FromDatetime(value)

    return stamp


def organization_message(
    row: OrganizationRow,
) -> organization_pb2.Organization:
    return organization_pb2.Organization(
        org_id=row.org_id,
        name=row.name,
        plan=plan_value(row.plan),
        state=organization_pb2.Organization.State.Value(row.state.upper()),
        create_time=_timestamp(row.create_time),
        ip_allowlist=row.ip_allowlist,
    )


def key_message(row: KeyRow) -> keys_pb2.ApiKey:
    """Return a key's public record.

    Its `expire_time` is when the key stops working: the earlier of the
    expiry it was created with and the end of its grace period. EXPIRING
    marks only a key rotated away; a key created with an expiry is ACTIVE
    until then.
    """
    now = datetime.datetime.now(datetime.UTC)
    end_time = row.end_time
    state = keys_pb2.ApiKey.ACTIVE
    if row.revoke_time is not None:
        state = keys_pb2.ApiKey.REVOKED
    elif end_time is not None and end_time <= now:
        state = keys_pb2.ApiKey.EXPIRED
    elif row.grace_end_time is not None:
        state = keys_pb2.ApiKey.EXPIRING
    message = keys_pb2.ApiKey(
        key_id=row.key_id,
        org_id=row.org_id,
        name=row.name,
        scopes=[Scope.Value(name) for name in row.scopes],
        state=state,
        create_time=_timestamp(row.create_time),
    )
    if end_time is not None:
        message.expire_time.CopyFrom(_timestamp(end_time))
    if row.revoke_time is not None:
        message.revoke_time.CopyFrom(_timestamp(row.revoke_time))

    return message


def _earliest(*times: datetime.datetime | None) -> datetime.datetime | None:
    return min((time for time in times if time is not None), default=None)


def _name_violations(name: str, field: str) -> list[FieldViolation]:
    if len(name) > MAX_NAME_LENGTH:
        return [FieldViolation(field, f"at most {MAX_NAME_LENGTH} characters")]

    return []


def valid_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False

    return True


async def _page_size(context, requested: int) -> int:
    try:
        return pagination.page_size(requested)
    except ValueError as error:
        await abort_invalid(context, [FieldViolation("pageSize", str(error))])


async def _page_after(context, token: str, identifier_is_uuid: bool = False):
    try:
        return pagination.decode_token(token, identifier_is_uuid)
    except pagination.InvalidPageToken as error:
        await abort_invalid(context, [FieldViolation("pageToken", str(error))])


async def issue_key(
    store: AuthStore,
    org_id: str,
    name: str,
    scopes: list[str],
    expire_time: datetime.datetime | None = None,
) -> keys_pb2.CreateKeyResponse:
    """Create a key; the response is the only place its secret appears."""
    secret = keys.generate_key()
    row = await store.insert_key(
        keys.new_key_id(),
        org_id,
        name,
        keys.key_hash(secret),
        scopes,
        expire_time,
    )

    return keys_pb2.CreateKeyResponse(key=key_message(row), api_key=secret)


class KeyServicer(keys_pb2_grpc.KeyServiceServicer):
    """Keys of the caller's own organization; the org comes from auth.

    A key may create, rotate or revoke only keys whose scopes it has
    itself, and a key it creates or rotates in never outlives it.
    """

    def __init__(self, store: AuthStore) -> None:
        self._store = store

    async def _caller(self, context) -> tuple[str, frozenset[str]]:
        org_id = caller_org_id(context)
        if not valid_uuid(org_id):
            await abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "no organization on the request: call through the edge",
            )
        scopes = frozenset(metadata_value(context, SCOPES_HEADER).split(","))

        return org_id, scopes

    async def _caller_key(self, context, org_id: str) -> KeyRow:
        """Return the row of the key the request authenticated with."""
        row = await self._store.get_key(
            org_id, metadata_value(context, KEY_ID_HEADER)
        )
        if row is None:
            await abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "the calling key was not found: call through the edge with "
                "an API key",
            )

        return row

    async def _named_key(self, context, org_id: str, key_id: str) -> KeyRow:
        """Return the key a request names by id, or end the RPC with 404.

        An id that no key can have is not found either, and is not echoed:
        it may be thousands of characters long.
        """
        if not keys.is_key_id(key_id):
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"key not found: key ids are {keys.KEY_ID_FORMAT}, as GET "
                "/v1/keys lists them",
            )
        row = await self._store.get_key(org_id, key_id)
        if row is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"key {key_id} not found in this organization: list its "
                "keys with GET /v1/keys",
            )

        return row

    async def _require_scopes_of(
        self, context, key: KeyRow, caller_scopes: frozenset[str], verb: str
    ) -> None:
        """Reject a change to a key that has scopes the caller lacks."""
        beyond = sorted(set(key.scopes) - caller_scopes)
        if beyond:
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"key {key.key_id} has scopes the calling key lacks "
                f"({', '.join(beyond)}): {verb} it with a key that has them",
            )

    async def CreateKey(self, request, context):
        org_id, caller_scopes = await self._caller(context)
        violations = _name_violations(request.name, "name")
        known = set(Scope.values()) - {Scope.SCOPE_UNSPECIFIED}
        requested = [
            Scope.Name(scope) for scope in request.scopes if scope in known
        ]
        if len(requested) != len(request.scopes):
            violations.append(
                FieldViolation(
                    "scopes",
                    "unknown scope: use one of " + ", ".join(ALL_SCOPES),
                )
            )
        beyond = sorted(set(requested) - caller_scopes)
        if beyond:
            violations.append(
                FieldViolation(
                    "scopes",
                    "a key can only grant scopes it has itself; the calling "
                    f"key lacks {', '.join(beyond)}",
                )
            )
        expire_time = None
        if request.HasField("expire_time"):
            try:
                expire_time = time_fields.to_datetime(request.expire_time)
            except ValueError as error:
                violations.append(FieldViolation("expireTime", str(error)))
            else:
                if expire_time <= datetime.datetime.now(datetime.UTC):
                    violations.append(
                        FieldViolation("expireTime", "must be in the future")
                    )
        if violations:
            await abort_invalid(context, violations)
        scopes = sorted(set(requested) or (caller_scopes & set(ALL_SCOPES)))
        # A key cannot outlive the key that created it, grace period
        # included.
        caller = await self._caller_key(context, org_id)
        expire_time = _earliest(expire_time, caller.end_time)

        return await issue_key(
            self._store, org_id, request.name, scopes, expire_time
        )

    async def ListKeys(self, request, context):
        org_id, _ = await self._caller(context)
        size = await _page_size(context, request.page_size)
        after = await _page_after(context, request.page_token)
        rows = await self._store.list_keys(org_id, size + 1, after)
        response = keys_pb2.ListKeysResponse(
            keys=[key_message(row) for row in rows[:size]]
        )
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = pagination.encode_token(
                last.create_time, last.key_id
            )

        return response

    async def RotateKey(self, request, context):
        org_id, caller_scopes = await self._caller(context)
        violations = []
        grace = DEFAULT_GRACE
        if request.HasField("grace_period"):
            try:
                grace = time_fields.to_timedelta(request.grace_period)
            except ValueError as error:
                violations.append(FieldViolation("gracePeriod", str(error)))
            else:
                if not datetime.timedelta(0) <= grace <= MAX_GRACE:
                    violations.append(
                        FieldViolation(
                            "gracePeriod",
                            "must be 0s to 604800s (7 days)",
                        )
                    )
        if violations:
            await abort_invalid(context, violations)
        old = await self._named_key(context, org_id, request.key_id)
        # The new key has the old key's scopes: the caller may only hand
        # out scopes it has itself, as when it creates a key.
        await self._require_scopes_of(context, old, caller_scopes, "rotate")
        now = datetime.datetime.now(datetime.UTC)
        if old.revoke_time is not None:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"key {old.key_id} is revoked: create a new key instead",
            )
        if old.end_time is not None and old.end_time <= now:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"key {old.key_id} has expired: create a new key instead",
            )
        # The new key keeps the expiry the old key was created with, not
        # the end of a grace period from an earlier rotation. Like a
        # created key, it cannot outlive the calling key.
        caller = await self._caller_key(context, org_id)
        expire_time = _earliest(old.expire_time, caller.end_time)
        # The new key exists before the old one stops: no downtime.
        created = await issue_key(
            self._store, org_id, old.name, list(old.scopes), expire_time
        )
        await self._store.end_grace_at(org_id, old.key_id, now + grace)

        return created

    async def RevokeKey(self, request, context):
        org_id, caller_scopes = await self._caller(context)
        key = await self._named_key(context, org_id, request.key_id)
        # Consistent with rotation: a key with fewer scopes cannot take a
        # broader key out of service.
        await self._require_scopes_of(context, key, caller_scopes, "revoke")
        row = await self._store.revoke_key(org_id, key.key_id)
        if row is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"key {key.key_id} not found in this organization",
            )
        log.info("auth.key_revoked", org_id=org_id, key_id=row.key_id)

        return key_message(row)


class OperatorServicer(operator_pb2_grpc.OperatorServiceServicer):
    """Organization administration with the operator credential."""

    def __init__(self, store: AuthStore) -> None:
        self._store = store

    async def _require_operator(self, context) -> None:
        # The edge sets this only after checking the operator token.
        if metadata_value(context, PRINCIPAL_HEADER) != "operator":
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "operator credential required",
            )

    async def CreateOrganization(self, request, context):
        await self._require_operator(context)
        violations = _name_violations(request.name, "name")
        if not request.name.strip():
            violations.append(FieldViolation("name", "must not be empty"))
        if request.plan == organization_pb2.Organization.PLAN_UNSPECIFIED:
            violations.append(
                FieldViolation("plan", "missing: use FREE, PRO or ENTERPRISE")
            )
        if violations:
            await abort_invalid(context, violations)
        row = await self._store.create_organization(
            request.name.strip(), plan_name(request.plan)
        )

        return organization_message(row)

    async def ListOrganizations(self, request, context):
        await self._require_operator(context)
        size = await _page_size(context, request.page_size)
        after = await _page_after(
            context, request.page_token, identifier_is_uuid=True
        )
        rows = await self._store.list_organizations(size + 1, after)
        response = operator_pb2.ListOrganizationsResponse(
            organizations=[organization_message(row) for row in rows[:size]]
        )
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = pagination.encode_token(
                last.create_time, last.org_id
            )

        return response

    async def _organization(self, context, org_id: str) -> OrganizationRow:
        if not valid_uuid(org_id):
            await abort_invalid(
                context, [FieldViolation("orgId", "must be a UUID")]
            )
        row = await self._store.get_organization(org_id)
        if row is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"organization {org_id} not found: list organizations with "
                "`arxio orgs list`",
            )

        return row

    async def _updated(
        self, context, org_id: str, row: OrganizationRow | None, field: str
    ) -> organization_pb2.Organization:
        """Return an organization that a store call just changed."""
        if row is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"organization {org_id} not found",
            )
        log.info("auth.organization_updated", org_id=org_id, changed=[field])

        return organization_message(row)

    async def GetOrganization(self, request, context):
        await self._require_operator(context)

        return organization_message(
            await self._organization(context, request.org_id)
        )

    async def SuspendOrganization(self, request, context):
        await self._require_operator(context)
        org_id = (await self._organization(context, request.org_id)).org_id
        row = await self._store.set_state(org_id, "suspended")

        return await self._updated(context, org_id, row, "state")

    async def ReactivateOrganization(self, request, context):
        await self._require_operator(context)
        org_id = (await self._organization(context, request.org_id)).org_id
        row = await self._store.set_state(org_id, "active")

        return await self._updated(context, org_id, row, "state")

    async def SetOrganizationPlan(self, request, context):
        await self._require_operator(context)
        if request.plan not in PLAN_VALUES:
            await abort_invalid(
                context,
                [
                    FieldViolation(
                        "plan", "missing: use FREE, PRO or ENTERPRISE"
                    )
                ],
            )
        org_id = (await self._organization(context, request.org_id)).org_id
        plan = plan_name(request.plan)
        row, changed = await self._store.set_plan(org_id, plan)
        # The allowlist is not cleared here: a downgrade must not silently
        # open the organization's keys to every address.
        if row is not None and not changed:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"organization {org_id} has an IP allowlist, which only the "
                "enterprise plan allows: remove it first with `arxio orgs "
                f"set-allowlist --org {org_id}` and no --cidr, then set the "
                f"{plan} plan",
            )

        return await self._updated(context, org_id, row, "plan")

    async def SetIpAllowlist(self, request, context):
        await self._require_operator(context)
        ranges, violations = parse_allowlist(list(request.cidrs))
        if violations:
            await abort_invalid(context, violations)
        org_id = (await self._organization(context, request.org_id)).org_id
        row, changed = await self._store.set_ip_allowlist(org_id, ranges)
        if row is not None and not changed:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"organization {org_id} is on the {row.plan} plan: IP "
                "allowlists need the enterprise plan; set it first with "
                f"`arxio orgs set-plan --org {org_id} --plan enterprise`",
            )

        return await self._updated(context, org_id, row, "ip_allowlist")

    async def CreateOrganizationKey(self, request, context):
        await self._require_operator(context)
        violations = _name_violations(request.name, "name")
        if not valid_uuid(request.org_id):
            violations.append(FieldViolation("orgId", "must be a UUID"))
        known = set(Scope.values()) - {Scope.SCOPE_UNSPECIFIED}
        scopes = sorted(
            {Scope.Name(scope) for scope in request.scopes if scope in known}
        )
        if len(set(request.scopes)) != len(scopes):
            violations.append(
                FieldViolation(
                    "scopes",
                    "unknown scope: use one of " + ", ".join(ALL_SCOPES),
                )
            )
        if violations:
            await abort_invalid(context, violations)
        if await self._store.get_organization(request.org_id) is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"organization {request.org_id} not found",
            )

        return await issue_key(
            self._store,
            request.org_id,
            request.name,
            scopes or list(ALL_SCOPES),
        )


def parse_allowlist(
    cidrs: list[str],
) -> tuple[list[str], list[FieldViolation]]:
    """Return the normalized ranges of an allowlist, or its violations."""
    if len(cidrs) > MAX_ALLOWLIST_RANGES:
        return [], [
            FieldViolation(
                "cidrs",
                f"at most {MAX_ALLOWLIST_RANGES} ranges allowed, "
                f"got {len(cidrs)}",
            )
        ]
    ranges, violations = [], []
    for index, cidr in enumerate(cidrs):
        field = f"cidrs[{index}]"
        try:
            network = ipaddress.ip_network(cidr.strip())
        except ValueError as error:
            reason = str(error)
            if "host bits set" in reason:
                network = ipaddress.ip_network(cidr.strip(), strict=False)
                reason = f"has host bits set: use {network}"
            else:
                reason = (
                    f"{cidr[:64]!r} is not an IPv4 or IPv6 range: use CIDR "
                    "notation such as 203.0.113.0/24 or 2001:db8::/32"
                )
            violations.append(FieldViolation(field, reason))
            continue
        ranges.append(str(network))

    return sorted(set(ranges)), violations


def _parse_day(value: str, field: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{field} {value[:40]!r} is not a YYYY-MM-DD date"
        ) from None


class AccountServicer(accounts_pb2_grpc.AccountServiceServicer):
    """Organizations and usage for other services; never routed by the edge."""

    def __init__(self, store: AuthStore) -> None:
        self._store = store

    async def GetOrganization(self, request, context):
        if not valid_uuid(request.org_id):
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                "organization not found: orgId must be a UUID",
            )
        row = await self._store.get_organization(request.org_id)
        if row is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"organization {request.org_id} not found",
            )

        return organization_message(row)

    async def ListDailyUsage(self, request, context):
        if not valid_uuid(request.org_id):
            await abort_invalid(
                context, [FieldViolation("orgId", "must be a UUID")]
            )
        try:
            start = _parse_day(request.start_date, "startDate")
            end = _parse_day(request.end_date, "endDate")
        except ValueError as error:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        rows = await self._store.list_daily_usage(request.org_id, start, end)

        return accounts_pb2.ListDailyUsageResponse(
            days=[
                accounts_pb2.DailyRequestCount(
                    date=day.isoformat(), request_count=count
                )
                for day, count in rows
            ]
        )

    async def SetOrganizationPlan(self, request, context):
        if not valid_uuid(request.org_id):
            await abort_invalid(
                context, [FieldViolation("orgId", "must be a UUID")]
            )
        current = list(request.current_plans)
        if request.plan not in PLAN_VALUES or not set(current) <= PLAN_VALUES:
            await abort_invalid(
                context,
                [FieldViolation("plan", "use FREE, PRO or ENTERPRISE")],
            )
        row, changed = await self._store.set_plan_if_current(
            request.org_id,
            plan_name(request.plan),
            [plan_name(plan) for plan in current],
        )
        if row is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"organization {request.org_id} not found",
            )
        log.info(
            "auth.organization_plan_set",
            org_id=row.org_id,
            plan=row.plan,
            changed=changed,
        )

        return accounts_pb2.SetOrganizationPlanResponse(
            organization=organization_message(row), changed=changed
        )
