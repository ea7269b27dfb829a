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
from services.common.identity import (
    CLIENT_ADDRESS_HEADER,
    KEY_ID_HEADER,
    ORG_ID_HEADER,
    PRINCIPAL_HEADER,
    SCOPES_HEADER,
)

TEMPLATE = Path(__file__).resolve().parents[2] / "envoy" / "envoy.yaml.tmpl"
UPSTREAMS = ("auth", "cds", "audit", "billing")
# Largest JSON response the transcoder builds: 4 MiB, the largest message
# a gRPC client accepts by default, far above a 100-medication review.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
MAX_REQUEST_BYTES = 64 * 1024
# Body limit of routes that skip the auth decision and verify a signature
# instead (Stripe's webhook). Stripe documents no maximum event size, but
# its events embed at most 10 items of each list, which keeps them far
# below this.
# NOTE: an estimate, not a limit Stripe publishes.
WEBHOOK_MAX_REQUEST_BYTES = 512 * 1024

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
# Request header carrying the content type before transcoding.
ORIGINAL_CONTENT_TYPE_HEADER = "x-arxio-original-content-type"

# gRPC code of each HTTP status that Envoy produces itself.
LOCAL_REPLY_CODES = {
    400: 3,
    403: 7,
    404: 5,
    408: 4,
    413: 3,
    415: 3,
    431: 3,
    500: 13,
    502: 14,
    503: 14,
    504: 4,
}


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
    # False only in benchmarks, to measure what the auth decision costs:
    # without it nothing checks keys, so never serve traffic this way.
    authorization: bool = True


def _header_option(name: str, value: str) -> dict:
    return {
        "header": {"key": name, "value": value},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }


def _error_format(code: int) -> dict:
    return {
        "json_format": {
            "code": code,
            "message": "%LOCAL_REPLY_BODY%",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.RequestInfo",
                    "requestId": "%REQ(X-REQUEST-ID)%",
                }
            ],
        },
        "content_type": "application/json",
    }


def _status_filter(status: int) -> dict:
    return {
        "status_code_filter": {
            "comparison": {
                "op": "EQ",
                "value": {"default_value": status, "runtime_key": "unused"},
            }
        }
    }


def local_reply_config() -> dict:
    """Turn Envoy's plain-text errors into `google.rpc.Status` JSON."""
    unavailable = _error_format(14)
    unavailable["json_format"]["message"] = (
        "authorization is unavailable: retry shortly"
    )
    mappers = [
        # ext_authz could not reach the auth service: fail closed, in JSON.
        {
            "filter": {
                "and_filter": {
                    "filters": [
                        _status_filter(503),
                        {"response_flag_filter": {"flags": ["UAEX"]}},
                    ]
                }
            },
            "body_format_override": unavailable,
        },
        # The auth service's own denials already carry their JSON body.
        {
            "filter": {"response_flag_filter": {"flags": ["UAEX"]}},
            "body_format_override": {
                "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                "content_type": "application/json",
            },
        },
    ]
    for status, code in LOCAL_REPLY_CODES.items():
        mappers.append(
            {
                "filter": _status_filter(status),
                "body_format_override": _error_format(code),
            }
        )

    return {"mappers": mappers, "body_format": _error_format(2)}


# One JSON object per request: what the audit ingester reads. Only ids,
# the route without its query string, and the outcome: no other header,
# no query and no body, so no PHI and no key is ever written.
ACCESS_LOG_FORMAT = {
    "time": "%START_TIME(%Y-%m-%dT%H:%M:%S.%6fZ)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": f"%REQ({ORIGINAL_METHOD_HEADER.upper()}?:METHOD)%",
    "path": "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "content_type": f"%REQ({ORIGINAL_CONTENT_TYPE_HEADER.upper()})%",
    "status": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS_NUMBER%",
    "duration_ms": "%DURATION%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "org_id": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:org_id)%",
    "key_id": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:key_id)%",
    "action": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:action)%",
    "resource_type": (
        "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:resource_type)%"
    ),
}


def access_log(path: Path) -> list[dict]:
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers"
                ".file.v3.FileAccessLog",
                "path": str(path),
                "log_format": {
                    "json_format": ACCESS_LOG_FORMAT,
                    # Provides REQ_WITHOUT_QUERY: a credential a client put
                    # in the query string never reaches the file.
                    "formatters": [
                        {
                            "name": "envoy.formatter.req_without_query",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy"
                                ".extensions.formatter.req_without_query"
                                ".v3.ReqWithoutQuery"
                            },
                        }
                    ],
                },
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
                    "response_mutations": [
                        {"remove": name} for name in GRPC_RESPONSE_HEADERS
                    ]
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


def routes() -> list[dict]:
    """Return one route per REST binding and one per gRPC service."""
    json_routes = []
    grpc_services: dict[str, str] = {}
    for method in methods.public_methods():
        cluster = method.action.split(".", 1)[0]
        if method.http is not None:
            route = _json_route(method, cluster)
            signed = methods.Authentication.WEBHOOK_SIGNATURE
            if method.authentication == signed:
                _verify_signature_in_service(route)
            json_routes.append(route)
        service = method.grpc_path.rsplit("/", 1)[0] + "/"
        grpc_services[service] = cluster
    grpc_routes = [
        {
            "name": f"grpc{prefix.rstrip('/')}",
            "match": {"prefix": prefix, "grpc": {}},
            "route": {"cluster": cluster, "timeout": "60s"},
        }
        for prefix, cluster in grpc_services.items()
    ]

    return json_routes + grpc_routes


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
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {},
            }
        ],
    }


def _cors_policy(origins: tuple[str, ...]) -> dict:
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3"
        ".CorsPolicy",
        "allow_origin_string_match": [{"exact": origin} for origin in origins],
        "allow_methods": "GET, POST, DELETE, OPTIONS",
        "allow_headers": "content-type, x-api-key",
        "expose_headers": "x-request-id, x-ratelimit-limit, "
        "x-ratelimit-remaining, x-ratelimit-reset, retry-after",
        "max_age": "600",
    }


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
        max_response_bytes=MAX_RESPONSE_BYTES,
        descriptor=settings.descriptor,
    )
    config = yaml.safe_load(text)
    resources = config["static_resources"]
    manager = resources["listeners"][0]["filter_chains"][0]["filters"][0]
    manager = manager["typed_config"]
    manager["access_log"] = access_log(settings.access_log_path)
    manager["local_reply_config"] = local_reply_config()
    virtual_host = {
        "name": "api",
        "domains": ["*"],
        "routes": routes(),
    }
    if settings.cors_origins:
        virtual_host["typed_per_filter_config"] = {
            "envoy.filters.http.cors": _cors_policy(settings.cors_origins)
        }
    manager["route_config"] = {
        "name": "api",
        "virtual_hosts": [virtual_host],
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
    mutations["mutations"]["request_mutations"] = [
        {"append": _header_option(ORIGINAL_METHOD_HEADER, "%REQ(:METHOD)%")},
        # The transcoder changes a REST request's content type to gRPC; the
        # audit trail tells native gRPC calls apart by the original one.
        {
            "append": _header_option(
                ORIGINAL_CONTENT_TYPE_HEADER, "%REQ(CONTENT-TYPE)%"
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
    transcoder = filters["envoy.filters.http.grpc_json_transcoder"]
    transcoder["typed_config"]["services"] = transcoded_services()
    resources["clusters"] = [
        _cluster(name, settings.upstreams[name], settings)
        for name in UPSTREAMS
    ]

    return config


def render_text(settings: EdgeSettings) -> str:
    return yaml.safe_dump(render(settings), sort_keys=False)
