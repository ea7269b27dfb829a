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
from services.common.identity import CLIENT_ADDRESS_HEADER

TEMPLATE = Path(__file__).resolve().parents[2] / "envoy" / "envoy.yaml.tmpl"
UPSTREAMS = ("auth", "cds", "audit", "billing")
MAX_REQUEST_BYTES = 64 * 1024

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


def access_log() -> list[dict]:
    return [
        {
            "name": "envoy.access_loggers.http_grpc",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers"
                ".grpc.v3.HttpGrpcAccessLogConfig",
                "common_config": {
                    "log_name": "edge",
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "audit"}},
                    "buffer_flush_interval": "0.5s",
                },
                "additional_request_headers_to_log": [
                    "content-type",
                    ORIGINAL_METHOD_HEADER,
                ],
                "additional_response_headers_to_log": ["grpc-status"],
                "additional_response_trailers_to_log": ["grpc-status"],
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


def routes() -> list[dict]:
    """Return one route per REST binding and one per gRPC service."""
    json_routes = []
    grpc_services: dict[str, str] = {}
    for method in methods.public_methods():
        cluster = method.action.split(".", 1)[0]
        if method.http is not None:
            json_routes.append(_json_route(method, cluster))
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
        descriptor=settings.descriptor,
    )
    config = yaml.safe_load(text)
    resources = config["static_resources"]
    manager = resources["listeners"][0]["filter_chains"][0]["filters"][0]
    manager = manager["typed_config"]
    manager["access_log"] = access_log()
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
