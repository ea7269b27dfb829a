"""Render Envoy's configuration from envoy/envoy.yaml.tmpl.

The template holds the edge's fixed shape; routes, clusters and the
transcoder's service list come from the API's descriptors, so the edge
routes exactly the RPCs the protos declare.
"""

import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from services.common import methods
from services.common.edge_replies import (
    AUTH_UNAVAILABLE_MESSAGE,
    LOCAL_REPLY_CODES,
    LOCAL_REPLY_MESSAGES,
    MAX_REQUEST_BYTES,
)
from services.common.identity import (
    CLIENT_ADDRESS_HEADER,
    KEY_ID_HEADER,
    ORG_ID_HEADER,
    PRINCIPAL_HEADER,
    SCOPES_HEADER,
)
from services.launcher import edge_guards

TEMPLATE = Path(__file__).resolve().parents[2] / "envoy" / "envoy.yaml.tmpl"
UPSTREAMS = ("auth", "cds", "audit", "billing")
# Retries of requests that never reached a service, on another replica: a
# refused connection (a replica that stopped), a stream the replica refused
# (one that arrived after its GOAWAY) or a reset before the request was
# sent. A request that a service may have started is never retried, so a
# non-idempotent call such as key creation cannot run twice.
UNSENT_REQUEST_RETRY = {
    "retry_on": "connect-failure,refused-stream,reset-before-request",
    "num_retries": 2,
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host"
                ".previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ],
    "host_selection_retry_max_attempts": 3,
}
# Cluster of Envoy's admin interface, which only the metrics listener uses.
METRICS_ADMIN_CLUSTER = "envoy_admin"
# Largest JSON response the transcoder builds: 4 MiB, the largest message
# a gRPC client accepts by default, far above a 100-medication review.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# Body bytes that ext_authz sends the auth decision at most: one more than
# the limit, so that the decision can distinguish a body over the limit,
# which it rejects with 413, from one at the limit.
AUTH_BODY_BYTES = MAX_REQUEST_BYTES + 1
# Body limit of routes that skip the auth decision and verify a signature
# instead (Stripe's webhook). Stripe documents no maximum event size, but
# its events embed at most 10 items of each list, which keeps them far
# below this.
# NOTE: an estimate, not a limit Stripe publishes.
WEBHOOK_MAX_REQUEST_BYTES = 512 * 1024
# Body limit of the CDS Hooks routes, whose requests carry an EHR's FHIR
# resources: a patient's active medications, conditions and allergies.
# NOTE: sized for at most 100 medications, conditions and allergies with
# verbose FHIR JSON, not a limit that the CDS Hooks specification sets.
CDS_HOOKS_MAX_REQUEST_BYTES = 512 * 1024
# CDS Hooks wants 412 when required prefetch data is missing, a status
# the transcoder never produces, because it maps a gRPC error to 400 and
# drops the gRPC headers. So the service returns such a REST call a JSON
# error body with this response header, and this script, run on the
# hooks' REST routes only, turns the header into the HTTP status.
CDS_HOOKS_STATUS_HEADER = "x-arxio-http-status"
CDS_HOOKS_STATUS_SCRIPT = f"""
function envoy_on_response(response_handle)
  local headers = response_handle:headers()
  local status = headers:get("{CDS_HOOKS_STATUS_HEADER}")
  if status == nil then
    return
  end
  headers:remove("{CDS_HOOKS_STATUS_HEADER}")
  if status == "412" then
    headers:replace(":status", "412")
  end
end
"""

SECURITY_HEADERS = {
    "strict-transport-security": "max-age=31536000; includeSubDomains",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "x-xss-protection": "0",
    "cache-control": "no-store",
}
# Stripped from every response.
INTERNAL_RESPONSE_HEADERS = ("x-envoy-upstream-service-time", "server")
# Stripped from JSON responses only; gRPC clients need them.
GRPC_RESPONSE_HEADERS = (
    "grpc-accept-encoding",
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
)

# Request header carrying the HTTP method before transcoding.
ORIGINAL_METHOD_HEADER = "x-arxio-original-method"
# Request header carrying the content type before transcoding, cut to
# MAX_ORIGINAL_CONTENT_TYPE_LENGTH characters: a copy in full could double
# a client's headers past the edge's limit.
ORIGINAL_CONTENT_TYPE_HEADER = "x-arxio-original-content-type"
MAX_ORIGINAL_CONTENT_TYPE_LENGTH = 256

# Messages of requests that match no route, whose replies Envoy leaves
# empty.
NO_ROUTE_MESSAGE = (
    "no API method at this path and HTTP method: the API reference is "
    "at /v1/openapi.json"
)
NO_ROUTE_GRPC_MESSAGE = (
    "unknown gRPC service or method: call a method that the API's protos "
    "declare"
)


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int


@dataclass(frozen=True)
class EdgeSettings:
    """Everything that differs between a laptop, the tests and a cluster."""

    edge_port: int
    admin_port: int
    certs_dir: Path
    descriptor: Path
    # Each service's replicas; Envoy balances requests across them.
    upstreams: dict[str, tuple[Upstream, ...]]
    edge_address: str = "127.0.0.1"
    # STATIC for addresses, STRICT_DNS for Kubernetes service names.
    cluster_type: str = "STATIC"
    trusted_hops: int = 0
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    # The JSON-lines access log that the audit ingester reads.
    access_log_path: Path = Path("/var/log/arxio/access.log")
    # Port of a plaintext listener on edge_address that serves only
    # Envoy's Prometheus stats, at /metrics and /stats/prometheus; None
    # serves none. The admin interface itself stays on 127.0.0.1.
    metrics_port: int | None = None
    # Open downstream connections beyond which Envoy closes new ones. Keep
    # it below Envoy's open-file limit (edge_guards.connection_limit).
    max_connections: int = edge_guards.MAX_CONNECTIONS
    # Heap size in bytes that Envoy's overload manager measures pressure
    # against; keep it below the memory limit of Envoy's container.
    max_heap_bytes: int = 1024 * 1024 * 1024
    # False only in benchmarks, to measure what the auth decision costs:
    # without it nothing checks keys, so never serve traffic this way.
    authorization: bool = True


def _header_option(name: str, value: str) -> dict:
    return {
        "header": {"key": name, "value": value},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }


def _error_format(code: int, request_id: str = "%REQ(X-REQUEST-ID)%") -> dict:
    return {
        "json_format": {
            "code": code,
            "message": "%LOCAL_REPLY_BODY%",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.RequestInfo",
                    "requestId": request_id,
                }
            ],
        },
        "content_type": "application/json",
    }


# Dynamic metadata namespace of what the header_to_metadata filter records
# for the access log: the edge's request id, the request's method and
# content type before transcoding, and the grpc-status a service sent,
# which the REST routes strip from the response.
EDGE_METADATA = "arxio.edge"

# Envoy rejects some requests before it replaces a client's X-Request-ID
# with its own. Its HTTP codec rejects some (431, 426, malformed HTTP/1,
# the request headers timeout). Others lack a Host header, have a path
# that is not absolute (`OPTIONS *`), ask for a protocol upgrade such as
# WebSocket (403), or meet the overload manager's 503.
# The filter chain never decodes these requests, so the header_to_metadata
# filter has not recorded the edge's id. Their replies get a fresh id, the
# same in the header and the body, so that a client never picks a reply's
# id.
_NO_REQUEST_ID = {
    "metadata_filter": {
        "matcher": {
            "filter": EDGE_METADATA,
            "path": [{"key": "request_id"}],
            # Set values never match null_match, so only an unset key
            # passes, through match_if_key_not_found.
            "value": {"null_match": {}},
        },
        "match_if_key_not_found": True,
    }
}
_FRESH_REQUEST_ID = {
    "header": {"key": "x-request-id", "value": "%UNIQUE_ID%"},
    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
}


def _security_headers() -> list[dict]:
    """Return the security headers as a local reply mapper adds them.

    The header_mutation filter misses replies sent before Envoy builds the
    filter chain, such as the overload manager's 503.
    """
    return [
        _header_option(name, value) for name, value in SECURITY_HEADERS.items()
    ]


def _error_mappers(
    status_filter: dict, code: int, message: str | None = None
) -> list[dict]:
    """Return the mappers of one status: without a request id, then with.

    `message` replaces the reply's own text, which Envoy leaves empty or
    sets to the bare reason phrase for some statuses.
    """
    fresh = _error_format(code, "%RESP(X-REQUEST-ID)%")
    usual = _error_format(code)
    if message is not None:
        fresh["json_format"]["message"] = message
        usual["json_format"]["message"] = message

    return [
        {
            "filter": {
                "and_filter": {"filters": [status_filter, _NO_REQUEST_ID]}
            },
            "headers_to_add": [*_security_headers(), _FRESH_REQUEST_ID],
            "body_format_override": fresh,
        },
        {
            "filter": status_filter,
            "headers_to_add": _security_headers(),
            "body_format_override": usual,
        },
    ]


def _status_filter(status: int, op: str = "EQ") -> dict:
    return {
        "status_code_filter": {
            "comparison": {
                "op": op,
                "value": {"default_value": status, "runtime_key": "unused"},
            }
        }
    }


# Envoy sends a local reply to a gRPC request (content type
# application/grpc, application/grpc+proto and the like, but not gRPC-Web)
# as HTTP 200 with grpc-status from the HTTP status and the reply's body
# as grpc-message. The transcoder sets application/grpc on REST requests
# too, so the mappers read the content type that the header_to_metadata
# filter recorded from the client. A request that the filter chain never
# decoded has no recorded values, and only the client's own Content-Type,
# which no filter has changed: a client-sent x-arxio-original-content-type
# is never read.
_GRPC_CONTENT_TYPE = {"safe_regex": {"regex": r"^application/grpc([+;].*)?$"}}
_GRPC_REQUEST = {
    "or_filter": {
        "filters": [
            {
                "metadata_filter": {
                    "matcher": {
                        "filter": EDGE_METADATA,
                        "path": [{"key": "content_type"}],
                        "value": {"string_match": _GRPC_CONTENT_TYPE},
                    },
                    # Envoy's default passes a request without the key.
                    "match_if_key_not_found": False,
                }
            },
            {
                "and_filter": {
                    "filters": [
                        _NO_REQUEST_ID,
                        {
                            "header_filter": {
                                "header": {
                                    "name": "content-type",
                                    "string_match": _GRPC_CONTENT_TYPE,
                                }
                            }
                        },
                    ]
                }
            },
        ]
    }
}
_NO_ROUTE = {"response_flag_filter": {"flags": ["NR"]}}
_AUTH_REPLY = {"response_flag_filter": {"flags": ["UAEX"]}}


def _grpc_mappers(condition: dict, message: str) -> list[dict]:
    """Return the mappers that give a gRPC caller `message` as plain text.

    `message` may be an Envoy format string such as %LOCAL_REPLY_BODY%. An
    empty result leaves any grpc-message the reply already carries.
    """
    body = {
        "text_format_source": {"inline_string": message},
        "content_type": "text/plain",
    }
    matched = [_GRPC_REQUEST, condition]

    return [
        {
            "filter": {"and_filter": {"filters": [*matched, _NO_REQUEST_ID]}},
            "headers_to_add": [*_security_headers(), _FRESH_REQUEST_ID],
            "body_format_override": body,
        },
        {
            "filter": {"and_filter": {"filters": matched}},
            "headers_to_add": _security_headers(),
            "body_format_override": body,
        },
    ]


def _grpc_reply_mappers() -> list[dict]:
    """Return the mappers of replies to gRPC requests, which come first.

    A JSON body would reach a gRPC client as its message text, so these
    replies get a plain message instead. The request id is in the
    x-request-id header.
    """
    mappers = [
        *_grpc_mappers(
            {"and_filter": {"filters": [_status_filter(503), _AUTH_REPLY]}},
            AUTH_UNAVAILABLE_MESSAGE,
        ),
        # The auth service's gRPC denials carry grpc-status and
        # grpc-message, and an empty body that keeps them.
        *_grpc_mappers(_AUTH_REPLY, "%LOCAL_REPLY_BODY%"),
        *_grpc_mappers(_NO_ROUTE, NO_ROUTE_GRPC_MESSAGE),
    ]
    for status, message in LOCAL_REPLY_MESSAGES.items():
        mappers += _grpc_mappers(_status_filter(status), message)
    mappers += _grpc_mappers(_status_filter(400, "GE"), "%LOCAL_REPLY_BODY%")

    return mappers


# Local replies of the JSON transcoder, whose text quotes the request: the
# body around a JSON syntax error, or a query parameter's value.
_TRANSCODER_FAILURE = {
    "extension_filter": {
        "name": "envoy.access_loggers.extension_filters.cel",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers"
            ".filters.cel.v3.ExpressionFilter",
            # grpc_json_transcode_failure{CODE}, with an early_ prefix when
            # the headers (path, query string) failed.
            "expression": "response.code_details.contains("
            "'grpc_json_transcode_failure')",
        },
    }
}
TRANSCODER_FAILURE_MESSAGE = (
    "invalid request: a query parameter is unknown, or a parameter or the "
    "body does not fit its field's type. The API reference at "
    "/v1/openapi.json lists each method's fields and their types"
)
# Envoy's HTTP/1 codec rejects a Transfer-Encoding other than chunked, such
# as "gzip, chunked", with 501, although the request is what is wrong.
_UNSUPPORTED_TRANSFER_ENCODING = {
    "extension_filter": {
        "name": "envoy.access_loggers.extension_filters.cel",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers"
            ".filters.cel.v3.ExpressionFilter",
            "expression": "response.code_details == "
            "'http1.invalid_transfer_encoding'",
        },
    }
}
UNSUPPORTED_TRANSFER_ENCODING_MESSAGE = (
    "unsupported Transfer-Encoding: send the body with Content-Length or "
    "with Transfer-Encoding: chunked alone"
)


# ext_authz rejects its own result with 500 when the identity headers it
# adds take a request past max_request_headers_kb or max_headers_count: the
# client sent headers just under the limits.
_HEADERS_OVERFLOWED = {
    "extension_filter": {
        "name": "envoy.access_loggers.extension_filters.cel",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers"
            ".filters.cel.v3.ExpressionFilter",
            "expression": "response.code_details == 'ext_authz_invalid'",
        },
    }
}


def _header_overflow_mappers() -> list[dict]:
    """Return the mappers that turn that 500 into the 431 it stands for."""
    message = LOCAL_REPLY_MESSAGES[431]
    mappers = [
        *_grpc_mappers(_HEADERS_OVERFLOWED, message),
        *_error_mappers(_HEADERS_OVERFLOWED, LOCAL_REPLY_CODES[431], message),
    ]
    for mapper in mappers:
        mapper["status_code"] = 431

    return mappers


def _input_error_mappers() -> list[dict]:
    """Return the mappers that replace Envoy's text on bad input.

    The transcoder's messages quote request text, which may be patient
    data; the codec's 501 for a Transfer-Encoding becomes a 400.
    """
    transcoder = _error_mappers(
        {
            "and_filter": {
                "filters": [_status_filter(400), _TRANSCODER_FAILURE]
            }
        },
        3,
        TRANSCODER_FAILURE_MESSAGE,
    )
    transfer_encoding = _error_mappers(
        _UNSUPPORTED_TRANSFER_ENCODING,
        3,
        UNSUPPORTED_TRANSFER_ENCODING_MESSAGE,
    )
    for mapper in transfer_encoding:
        mapper["status_code"] = 400

    return transcoder + transfer_encoding


def local_reply_config() -> dict:
    """Turn Envoy's plain-text errors into `google.rpc.Status` JSON.

    gRPC callers get a plain grpc-message instead (see
    `_grpc_reply_mappers`).
    """
    unavailable = _error_format(14)
    unavailable["json_format"]["message"] = AUTH_UNAVAILABLE_MESSAGE
    mappers = [
        *_header_overflow_mappers(),
        *_grpc_reply_mappers(),
        # ext_authz could not reach the auth service: fail closed, in JSON.
        {
            "filter": {
                "and_filter": {"filters": [_status_filter(503), _AUTH_REPLY]}
            },
            "headers_to_add": _security_headers(),
            "body_format_override": unavailable,
        },
        # The auth service's own denials already carry their JSON body.
        {
            "filter": _AUTH_REPLY,
            "headers_to_add": _security_headers(),
            "body_format_override": {
                "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                "content_type": "application/json",
            },
        },
        # No route matched; Envoy's reply has no text of its own.
        *_error_mappers(
            {"and_filter": {"filters": [_status_filter(404), _NO_ROUTE]}},
            5,
            NO_ROUTE_MESSAGE,
        ),
        *_input_error_mappers(),
    ]
    for status, code in LOCAL_REPLY_CODES.items():
        mappers += _error_mappers(
            _status_filter(status), code, LOCAL_REPLY_MESSAGES.get(status)
        )
    # Any other error status is UNKNOWN. A reply below 400 (the API
    # description) keeps its body.
    mappers += _error_mappers(_status_filter(400, "GE"), 2)

    return {"mappers": mappers}


# One JSON object per request: what the audit ingester reads. Only ids,
# the name of the route the request matched and the outcome: no path, no
# query string, no other header and no body, so nothing a client typed
# into the URL, no PHI and no key is ever written.
#
# Every value that a request can make long is cut to the length after its
# colon, so that no line exceeds the ingester's limit (MAX_LINE_BYTES in
# services/audit/ingest.py, checked by tests/audit/test_access_log.py).
_AUTH_METADATA = "envoy.filters.http.ext_authz"
ACCESS_LOG_FORMAT = {
    "time": "%START_TIME(%Y-%m-%dT%H:%M:%S.%6fZ)%",
    # The edge's id, as the filter chain saw it. Unset when Envoy rejected
    # the request before it replaced a client's X-Request-ID.
    "request_id": f"%DYNAMIC_METADATA({EDGE_METADATA}:request_id):64%",
    # The X-Request-ID the client received: the edge's id, or the fresh
    # one a local reply mapper gave a request rejected that early.
    "reply_request_id": "%RESP(X-REQUEST-ID):64%",
    # The method and content type before transcoding, as the
    # header_mutation filter copied them. Unset when the filter chain never
    # decoded the request, so a client-sent copy of those headers is never
    # logged.
    "method": f"%DYNAMIC_METADATA({EDGE_METADATA}:method):32%",
    "content_type": (
        f"%DYNAMIC_METADATA({EDGE_METADATA}:content_type)"
        f":{MAX_ORIGINAL_CONTENT_TYPE_LENGTH}%"
    ),
    # The request's own :method and Content-Type, which the transcoder
    # changes. The ingester reads them only where `method` is unset: no
    # filter ran, so they are what the client sent. Envoy's HTTP/1 codec
    # passes no headers of a request it rejects (431, 426, malformed
    # HTTP/1), so such a line has none of the four.
    "request_method": "%REQ(:METHOD):32%",
    "request_content_type": (
        f"%REQ(CONTENT-TYPE):{MAX_ORIGINAL_CONTENT_TYPE_LENGTH}%"
    ),
    # `<action>`, `<action>.grpc`, a guard's name, or "-" when no route
    # matched (see services/common/methods.py).
    "route": "%ROUTE_NAME%",
    "status": "%RESPONSE_CODE%",
    # What a gRPC caller got, from grpc-status. For other requests Envoy
    # derives it from the HTTP status, which may differ from the code in a
    # REST caller's JSON error.
    "grpc_status": "%GRPC_STATUS_NUMBER%",
    # The grpc-status a service sent, which the transcoder put in a REST
    # caller's JSON error as its code.
    "service_grpc_status": (
        f"%DYNAMIC_METADATA({EDGE_METADATA}:grpc_status):8%"
    ),
    # The code of the auth decision's denial, set only on a denial.
    "auth_grpc_status": (
        f"%DYNAMIC_METADATA({_AUTH_METADATA}:grpc_status):8%"
    ),
    "duration_ms": "%DURATION%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "org_id": f"%DYNAMIC_METADATA({_AUTH_METADATA}:org_id):64%",
    "key_id": f"%DYNAMIC_METADATA({_AUTH_METADATA}:key_id):64%",
    "action": f"%DYNAMIC_METADATA({_AUTH_METADATA}:action):128%",
    "resource_type": (
        f"%DYNAMIC_METADATA({_AUTH_METADATA}:resource_type):128%"
    ),
}


def _metadata_rule(header: str, key: str) -> dict:
    return {
        "header": header,
        "on_header_present": {
            "metadata_namespace": EDGE_METADATA,
            "key": key,
            "type": "STRING",
        },
        "remove": False,
    }


def edge_metadata_rules() -> dict:
    """Return the header_to_metadata rules that feed the access log.

    The filter runs right after header_mutation. On a request, so it runs
    only once Envoy has replaced a client's X-Request-ID, it records the
    edge's id, and the method and content type that header_mutation has
    just copied, a client's copies removed. On a response it runs before
    header_mutation removes grpc-status on the REST routes, and records
    the service's code.
    """
    return {
        "request_rules": [
            _metadata_rule("x-request-id", "request_id"),
            _metadata_rule(ORIGINAL_METHOD_HEADER, "method"),
            _metadata_rule(ORIGINAL_CONTENT_TYPE_HEADER, "content_type"),
        ],
        "response_rules": [_metadata_rule("grpc-status", "grpc_status")],
    }


def access_log(path: Path) -> list[dict]:
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers"
                ".file.v3.FileAccessLog",
                "path": str(path),
                "log_format": {"json_format": ACCESS_LOG_FORMAT},
            },
        }
    ]


def _json_route(method: methods.Method, cluster: str) -> dict:
    binding = method.http

    return {
        "name": method.action,
        "match": {
            "safe_regex": {"regex": binding.pattern.pattern},
            "headers": [
                {
                    "name": ":method",
                    "string_match": {"exact": binding.method},
                }
            ],
        },
        "route": {"cluster": cluster, "timeout": "60s"},
        "typed_per_filter_config": {
            "envoy.filters.http.header_mutation": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http"
                ".header_mutation.v3.HeaderMutationPerRoute",
                "mutations": {
                    # gRPC metadata a REST client has no use for, and
                    # whose invalid values would make the service fail
                    # with INTERNAL: grpc-timeout, grpc-encoding, binary
                    # headers that are not base64.
                    "request_mutations": [
                        {
                            "remove_on_match": {
                                "key_matcher": {"prefix": "grpc-"}
                            }
                        },
                        {
                            "remove_on_match": {
                                "key_matcher": {"suffix": "-bin"}
                            }
                        },
                    ],
                    "response_mutations": [
                        {"remove": name} for name in GRPC_RESPONSE_HEADERS
                    ],
                },
            }
        },
    }


def _verify_signature_in_service(route: dict) -> None:
    """Let a signed webhook through without the auth decision.

    The service verifies the request's signature itself. The access log
    still records the request, the route has its own body limit, and
    identity headers a caller sends are removed, since ext_authz no longer
    overwrites them.
    """
    route["request_headers_to_remove"] = [
        ORG_ID_HEADER,
        KEY_ID_HEADER,
        SCOPES_HEADER,
        PRINCIPAL_HEADER,
        "x-api-key",
        "authorization",
    ]
    route["typed_per_filter_config"] |= {
        "envoy.filters.http.ext_authz": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http"
            ".ext_authz.v3.ExtAuthzPerRoute",
            "disabled": True,
        },
        "envoy.filters.http.buffer": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http"
            ".buffer.v3.BufferPerRoute",
            "buffer": {"max_request_bytes": WEBHOOK_MAX_REQUEST_BYTES},
        },
    }


def _cds_hooks_route(route: dict) -> None:
    """Give a CDS Hooks route its body limit and 412 status.

    The auth decision still runs, without the body: the service reads the
    FHIR JSON itself.
    """
    route["typed_per_filter_config"] |= {
        "envoy.filters.http.buffer": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http"
            ".buffer.v3.BufferPerRoute",
            "buffer": {"max_request_bytes": CDS_HOOKS_MAX_REQUEST_BYTES},
        },
        "envoy.filters.http.ext_authz": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http"
            ".ext_authz.v3.ExtAuthzPerRoute",
            "check_settings": {"disable_request_body_buffering": True},
        },
        "envoy.filters.http.lua": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http"
            ".lua.v3.LuaPerRoute",
            "source_code": {"inline_string": CDS_HOOKS_STATUS_SCRIPT},
        },
    }


def routes() -> list[dict]:
    """Return one route per REST binding and per gRPC method.

    Each is named after its RPC, which is what the access log records. A
    route per gRPC service follows, for methods the service does not have.
    """
    json_routes = []
    grpc_routes = []
    grpc_services: dict[str, str] = {}
    for method in methods.public_methods():
        cluster = method.action.split(".", 1)[0]
        if method.http is not None:
            route = _json_route(method, cluster)
            signed = methods.Authentication.WEBHOOK_SIGNATURE
            if method.authentication == signed:
                _verify_signature_in_service(route)
            if method.authentication == methods.Authentication.CDS_HOOKS:
                _cds_hooks_route(route)
            if not method.http.body:
                edge_guards.reject_request_body(route)
            json_routes.append(route)
        grpc_routes.append(
            {
                "name": methods.grpc_route_name(method),
                "match": {"path": method.grpc_path, "grpc": {}},
                "route": {"cluster": cluster, "timeout": "60s"},
            }
        )
        service = method.grpc_path.rsplit("/", 1)[0] + "/"
        grpc_services[service] = cluster
    unknown_method_routes = [
        {
            "name": f"grpc{prefix.rstrip('/')}",
            "match": {"prefix": prefix, "grpc": {}},
            "route": {"cluster": cluster, "timeout": "60s"},
        }
        for prefix, cluster in grpc_services.items()
    ]

    return json_routes + grpc_routes + unknown_method_routes


def transcoded_services() -> list[str]:
    return sorted(
        {method.grpc_path.split("/")[1] for method in methods.public_methods()}
    )


def _cluster(
    name: str, replicas: tuple[Upstream, ...], settings: EdgeSettings
) -> dict:
    certs = settings.certs_dir

    return {
        "name": name,
        "type": settings.cluster_type,
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams"
                ".http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": upstream.host,
                                        "port_value": upstream.port,
                                    }
                                }
                            }
                        }
                        for upstream in replicas
                    ]
                }
            ],
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions"
                ".transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": name,
                "common_tls_context": {
                    "tls_params": {
                        "tls_minimum_protocol_version": "TLSv1_3",
                        "tls_maximum_protocol_version": "TLSv1_3",
                    },
                    "alpn_protocols": ["h2"],
                    "tls_certificates": [
                        {
                            "certificate_chain": {
                                "filename": str(certs / "envoy.crt")
                            },
                            "private_key": {
                                "filename": str(certs / "envoy.key")
                            },
                        }
                    ],
                    "validation_context": {
                        "trusted_ca": {"filename": str(certs / "ca.crt")},
                        "match_typed_subject_alt_names": [
                            {
                                "san_type": "DNS",
                                "matcher": {"exact": name},
                            }
                        ],
                    },
                },
            },
        },
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "2s",
                # Without it a cluster that had no traffic yet when it was
                # first checked waits Envoy's default of 60 s for the next
                # check, so a draining replica would keep getting requests.
                "no_traffic_interval": "2s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {},
            }
        ],
    }


def metrics_listener(settings: EdgeSettings) -> dict:
    """Return a listener that proxies only the admin's Prometheus stats.

    Prometheus can scrape it without reaching the admin interface, whose
    other endpoints change or stop the server.
    """
    stats = {"cluster": METRICS_ADMIN_CLUSTER}
    routes = [
        {
            "match": {"path": "/metrics"},
            "route": stats | {"prefix_rewrite": "/stats/prometheus"},
        },
        {"match": {"path": "/stats/prometheus"}, "route": stats},
        {
            "match": {"prefix": "/"},
            "direct_response": {
                "status": 404,
                "body": {
                    "inline_string": "not found: this port serves only "
                    "/metrics and /stats/prometheus\n"
                },
            },
        },
    ]

    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network"
        ".http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "metrics",
        "codec_type": "AUTO",
        # No server header of Envoy's own; the admin's is removed.
        "server_header_transformation": "PASS_THROUGH",
        "route_config": {
            "name": "metrics",
            "virtual_hosts": [
                {"name": "metrics", "domains": ["*"], "routes": routes}
            ],
            "response_headers_to_remove": list(INTERNAL_RESPONSE_HEADERS),
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters"
                    ".http.router.v3.Router"
                },
            }
        ],
    }

    return {
        "name": "metrics",
        "address": {
            "socket_address": {
                "address": settings.edge_address,
                "port_value": settings.metrics_port,
            }
        },
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network"
                        ".http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }


def admin_cluster(admin_port: int) -> dict:
    """Return the cluster of Envoy's own admin interface on 127.0.0.1."""
    return {
        "name": METRICS_ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": METRICS_ADMIN_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": "127.0.0.1",
                                        "port_value": admin_port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


# Response headers a browser script of an allowed origin may read.
EXPOSED_HEADERS = (
    "x-request-id, x-ratelimit-limit, x-ratelimit-remaining, "
    "x-ratelimit-reset, retry-after"
)


def _cors_policy(origins: tuple[str, ...]) -> dict:
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3"
        ".CorsPolicy",
        "allow_origin_string_match": [{"exact": origin} for origin in origins],
        "allow_methods": "GET, POST, DELETE, OPTIONS",
        "allow_headers": "content-type, x-api-key, authorization",
        "expose_headers": EXPOSED_HEADERS,
        "max_age": "600",
    }


def _allowed_origin_filter(origins: tuple[str, ...]) -> dict:
    """Return an access log filter of requests from an allowed origin."""
    matches = [
        {
            "header_filter": {
                "header": {"name": "origin", "string_match": {"exact": origin}}
            }
        }
        for origin in origins
    ]
    if len(matches) == 1:
        return matches[0]

    return {"or_filter": {"filters": matches}}


def _with_cors_headers(
    mappers: list[dict], origins: tuple[str, ...]
) -> list[dict]:
    """Give Envoy's own replies to an allowed origin their CORS headers.

    The CORS filter adds them only to replies that pass through it: not to
    replies that Envoy sends before its filter chain runs, nor to direct
    responses (415, guard 400s, the API description) or the 404 of an
    unmatched path. Each mapper gets a copy for allowed origins, placed
    before it, that adds them, and every mapper adds `Vary: Origin`. The
    last mapper covers replies below 400, which keep their body.
    """
    allowed = _allowed_origin_filter(origins)
    vary = _header_option("vary", "origin")
    cors = [
        _header_option("access-control-allow-origin", "%REQ(ORIGIN)%"),
        _header_option("access-control-expose-headers", EXPOSED_HEADERS),
    ]
    result = []
    for mapper in mappers:
        from_origin = {
            **mapper,
            "filter": {"and_filter": {"filters": [mapper["filter"], allowed]}},
            "headers_to_add": [*mapper.get("headers_to_add", []), vary, *cors],
        }
        plain = {
            **mapper,
            "headers_to_add": [*mapper.get("headers_to_add", []), vary],
        }
        result += [from_origin, plain]
    result.append(
        {
            "filter": allowed,
            "headers_to_add": [*_security_headers(), vary, *cors],
        }
    )

    return result


def render(settings: EdgeSettings) -> dict:
    """Return the complete Envoy configuration as a dict."""
    certs = settings.certs_dir
    text = string.Template(TEMPLATE.read_text()).substitute(
        admin_port=settings.admin_port,
        edge_address=settings.edge_address,
        edge_port=settings.edge_port,
        edge_cert=certs / "edge.crt",
        edge_key=certs / "edge.key",
        trusted_hops=settings.trusted_hops,
        max_request_bytes=MAX_REQUEST_BYTES,
        auth_body_bytes=AUTH_BODY_BYTES,
        max_response_bytes=MAX_RESPONSE_BYTES,
        descriptor=settings.descriptor,
    )
    config = yaml.safe_load(text)
    config["overload_manager"] = edge_guards.overload_manager(
        settings.max_heap_bytes, settings.max_connections
    )
    resources = config["static_resources"]
    manager = resources["listeners"][0]["filter_chains"][0]["filters"][0]
    manager = manager["typed_config"]
    manager["access_log"] = access_log(settings.access_log_path)
    manager["local_reply_config"] = local_reply_config()
    virtual_host = {
        "name": "api",
        "domains": ["*"],
        # Guards first: they match only requests the API routes must not
        # take. The OPTIONS route comes last.
        "routes": [
            edge_guards.api_description_route(),
            edge_guards.grpc_encoding_route(),
            *edge_guards.guard_routes(),
            *routes(),
            edge_guards.options_route("auth"),
        ],
        "retry_policy": UNSENT_REQUEST_RETRY,
    }
    if settings.authorization:
        # Room for the body that ext_authz buffers for the auth decision.
        # Below it, an HTTP/1 body over the connection's 32 KiB got 413
        # before the decision ran, and at AUTH_BODY_BYTES - 1 a chunked
        # body of AUTH_BODY_BYTES stalled until the request timeout.
        virtual_host["request_body_buffer_limit"] = AUTH_BODY_BYTES
    edge_guards.check_headers_without_auth(virtual_host["routes"])
    if settings.cors_origins:
        virtual_host["typed_per_filter_config"] = {
            "envoy.filters.http.cors": _cors_policy(settings.cors_origins)
        }
        manager["local_reply_config"]["mappers"] = _with_cors_headers(
            manager["local_reply_config"]["mappers"], settings.cors_origins
        )
    manager["route_config"] = {
        "name": "api",
        "virtual_hosts": [virtual_host],
        "max_direct_response_body_size_bytes": (
            edge_guards.MAX_DIRECT_RESPONSE_BYTES
        ),
    }
    if not settings.authorization:
        manager["http_filters"] = [
            entry
            for entry in manager["http_filters"]
            if entry["name"] != "envoy.filters.http.ext_authz"
        ]
    filters = {entry["name"]: entry for entry in manager["http_filters"]}
    mutations = filters["envoy.filters.http.header_mutation"]["typed_config"]
    # The transcoder turns every REST method into POST; the audit trail
    # records the method as the client sent it.
    # The auth decision checks IP allowlists against the client address
    # after the trusted proxy hops (xff_num_trusted_hops), which the
    # DOWNSTREAM_REMOTE_ADDRESS operator gives; a client-sent copy of the
    # header is overwritten.
    # A client's own copy of each header is removed first, so that none
    # survives where the edge's value formats empty.
    mutations["mutations"]["request_mutations"] = [
        {"remove": name}
        for name in (
            ORIGINAL_METHOD_HEADER,
            ORIGINAL_CONTENT_TYPE_HEADER,
            CLIENT_ADDRESS_HEADER,
        )
    ] + [
        {"append": _header_option(ORIGINAL_METHOD_HEADER, "%REQ(:METHOD)%")},
        # The transcoder changes a REST request's content type to gRPC; the
        # audit trail tells native gRPC calls apart by the original one.
        {
            "append": _header_option(
                ORIGINAL_CONTENT_TYPE_HEADER,
                f"%REQ(CONTENT-TYPE):{MAX_ORIGINAL_CONTENT_TYPE_LENGTH}%",
            )
        },
        {
            "append": _header_option(
                CLIENT_ADDRESS_HEADER,
                "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
            )
        },
    ]
    mutations["mutations"]["response_mutations"] = [
        {"append": _header_option(name, value)}
        for name, value in SECURITY_HEADERS.items()
    ] + [{"remove": name} for name in INTERNAL_RESPONSE_HEADERS]
    # The edge's request id, unless a local reply mapper gave the reply a
    # fresh one (see _NO_REQUEST_ID). Envoy's own copy, which the template
    # turns off (always_set_request_id_in_response), would overwrite that
    # fresh id with a client's.
    mutations["mutations"]["response_mutations"].append(
        {
            "append": {
                "header": {
                    "key": "x-request-id",
                    "value": "%REQ(X-REQUEST-ID)%",
                },
                "append_action": "ADD_IF_ABSENT",
            }
        }
    )
    if settings.cors_origins:
        mutations["mutations"]["response_mutations"].append(
            {"append": _header_option("vary", "origin")}
        )
    recorder = filters["envoy.filters.http.header_to_metadata"]
    recorder["typed_config"] |= edge_metadata_rules()
    transcoder = filters["envoy.filters.http.grpc_json_transcoder"]
    transcoder["typed_config"]["services"] = transcoded_services()
    resources["clusters"] = [
        _cluster(name, settings.upstreams[name], settings)
        for name in UPSTREAMS
    ]
    if settings.metrics_port is not None:
        resources["listeners"].append(metrics_listener(settings))
        resources["clusters"].append(admin_cluster(settings.admin_port))

    return config


def render_text(settings: EdgeSettings) -> str:
    return yaml.safe_dump(render(settings), sort_keys=False)
