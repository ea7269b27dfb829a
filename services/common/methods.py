"""The table of public RPCs, read from the API's own descriptors.

Paths, HTTP bindings, audit actions and access policies all come from the
protos, so the auth decision, the audit trail and the edge cannot drift
apart from the API contract.
"""

import re
from dataclasses import dataclass
from functools import cache

from arxio.audit.v1 import audit_pb2
from arxio.auth.v1 import ehr_pb2, keys_pb2, operator_pb2
from arxio.billing.v1 import billing_pb2
from arxio.cds.v1 import cds_pb2, hooks_pb2
from arxio.common.v1 import policy_pb2
from google.api import annotations_pb2
from google.protobuf import descriptor

# Every module whose services the edge exposes.
PUBLIC_API_MODULES = (
    cds_pb2,
    keys_pb2,
    operator_pb2,
    audit_pb2,
    billing_pb2,
    hooks_pb2,
    ehr_pb2,
)

Authentication = policy_pb2.MethodPolicy.Authentication

_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_.]*)(?:=[^}]*)?\}")


@dataclass(frozen=True)
class HttpBinding:
    """One REST binding of an RPC from its `google.api.http` option."""

    method: str
    template: str
    pattern: re.Pattern[str]
    # The request field the JSON body fills: "*" for the whole message, ""
    # for none (the fields come from the path and the query string).
    body: str = ""


@dataclass(frozen=True)
class Method:
    """One public RPC and what the edge, auth and audit need to know of it."""

    # Full gRPC path, for example `/arxio.cds.v1.Cl...Service/ClinicalReview`.
    grpc_path: str
    # Audit action, `<service>.<rpc in snake_case>`.
    action: str
    resource_type: str
    authentication: int
    # `ApiKey.Scope` value name the key needs, or "" for operator methods.
    scope: str
    http: HttpBinding | None
    # The request message's type, for checking request bodies.
    input_type: descriptor.Descriptor | None = None


def snake_case(name: str) -> str:
    """Convert an RPC name such as `ListAuditEvents` to `list_audit_events`."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _http_binding(method: descriptor.MethodDescriptor) -> HttpBinding | None:
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return None
    rule = options.Extensions[annotations_pb2.http]
    verb = rule.WhichOneof("pattern")
    template = getattr(rule, verb)
    parts = _VARIABLE.split(template)
    # Odd parts are variable names; each matches one path segment.
    regex = "".join(
        "[^/]+" if index % 2 else re.escape(part)
        for index, part in enumerate(parts)
    )

    return HttpBinding(
        verb.upper(), template, re.compile(f"^{regex}$"), rule.body
    )


def _methods_of(service: descriptor.ServiceDescriptor) -> list[Method]:
    # `arxio.cds.v1` names the service `cds` in audit actions.
    short_name = service.full_name.split(".")[1]
    methods = []
    for method in service.methods:
        options = method.GetOptions()
        if not options.HasExtension(policy_pb2.policy):
            raise ValueError(
                f"{method.full_name} has no (arxio.common.v1.policy) option: "
                "every public RPC must declare its access policy"
            )
        policy = options.Extensions[policy_pb2.policy]
        methods.append(
            Method(
                grpc_path=f"/{service.full_name}/{method.name}",
                action=f"{short_name}.{snake_case(method.name)}",
                resource_type=policy.resource_type,
                authentication=policy.authentication,
                scope=policy.scope,
                http=_http_binding(method),
                input_type=method.input_type,
            )
        )

    return methods


@cache
def public_methods() -> tuple[Method, ...]:
    """Return every RPC that the edge routes, in declaration order."""
    methods: list[Method] = []
    for module in PUBLIC_API_MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            methods.extend(_methods_of(service))

    return tuple(methods)


@cache
def _by_grpc_path() -> dict[str, Method]:
    return {method.grpc_path: method for method in public_methods()}


def find_method(http_method: str, path: str) -> Method | None:
    """Find the RPC a request is for, by its gRPC path or REST binding."""
    path = path.split("?", 1)[0]
    found = _by_grpc_path().get(path)
    if found is not None:
        return found
    for method in public_methods():
        binding = method.http
        if (
            binding is not None
            and binding.method == http_method.upper()
            and binding.pattern.match(path)
        ):
            return method

    return None


# The edge names its routes after the RPC they serve: `<action>` for the
# REST binding, `<action>.grpc` for the native gRPC path, and
# `<action>.<reason>` for a guard route that rejects a request to the REST
# binding. The access log records the name, never the path.
def grpc_route_name(method: Method) -> str:
    return f"{method.action}.grpc"


@cache
def _by_action() -> dict[str, Method]:
    return {method.action: method for method in public_methods()}


def find_route(route_name: str) -> tuple[Method, str] | None:
    """Find the RPC of an edge route by the route's name.

    Returns the RPC and the endpoint that audit entries record for it:
    the gRPC path for the gRPC route, and the REST template, such as
    `/v1/keys/{key_id}`, for the others. Returns None for a route that
    serves no RPC, such as the API description.
    """
    # An action is `<service>.<rpc>`; a third part names the route's kind.
    parts = route_name.split(".", 2)
    method = _by_action().get(".".join(parts[:2]))
    if method is None:
        return None
    if route_name == grpc_route_name(method) or method.http is None:
        return method, method.grpc_path

    return method, method.http.template
