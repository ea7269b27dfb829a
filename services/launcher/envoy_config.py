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
MAX_REQUEST_BYTES = 64 * 1024
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
    426: 9,
    431: 3,
    500: 13,
    502: 14,
    503: 14,
    504: 4,
}

# Messages of the statuses that only Envoy produces, in place of its empty
# text or bare reason phrase. The limits are those envoy/envoy.yaml.tmpl
# sets.
LOCAL_REPLY_MESSAGES = {
    413: "request body too large: the limit is "
    f"{MAX_REQUEST_BYTES // 1024} KiB, more on the Stripe webhook and CDS "
    "Hooks routes",
    408: "request timeout: the request did not arrive in time; send its "
    "headers within 10 seconds and the whole request within 60",
    426: "HTTP/1.0 is not supported: use HTTP/1.1 or HTTP/2",
    431: "request headers too large: send at most 100 headers of at most "
    "32 KiB in total",
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
    # Port of a plaintext listener on edge_address that serves only
    # Envoy's Prometheus stats, at /metrics and /stats/prometheus; None
    # serves none. The admin interface itself stays on 127.0.0.1.
    metrics_port: int | None = None
    # Open downstream connections beyond which Envoy closes new ones.
    max_connections: int = 25_000
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


# Envoy rejects some requests before their headers are complete (431, 426,
# malformed HTTP/1, the request headers timeout), so they have no request
# id. Their replies get a fresh one, the same in the header and the body.
# NOTE: the overload manager's 503 comes after the headers but before the
# edge replaces a client's X-Request-ID, so it carries the client's id.
_NO_REQUEST_ID = {
    "header_filter": {
        "header": {"name": "x-request-id", "present_match": False}
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
            "headers_to_add": _security_headers(),
            "body_format_override": unavailable,
        },
        # The auth service's own denials already carry their JSON body.
        {
            "filter": {"response_flag_filter": {"flags": ["UAEX"]}},
            "headers_to_add": _security_headers(),
            "body_format_override": {
                "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                "content_type": "application/json",
            },
        },
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
            if method.authentication == methods.Authentication.CDS_HOOKS:
                _cds_hooks_route(route)
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
        "route_config": {
            "name": "metrics",
            "virtual_hosts": [
                {"name": "metrics", "domains": ["*"], "routes": routes}
            ],
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


def _cors_policy(origins: tuple[str, ...]) -> dict:
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3"
        ".CorsPolicy",
        "allow_origin_string_match": [{"exact": origin} for origin in origins],
        "allow_methods": "GET, POST, DELETE, OPTIONS",
        "allow_headers": "content-type, x-api-key, authorization",
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
            *edge_guards.guard_routes(),
            *routes(),
            edge_guards.options_route("auth"),
        ],
        "retry_policy": UNSENT_REQUEST_RETRY,
    }
    edge_guards.check_headers_without_auth(virtual_host["routes"])
    if settings.cors_origins:
        virtual_host["typed_per_filter_config"] = {
            "envoy.filters.http.cors": _cors_policy(settings.cors_origins)
        }
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
    if settings.metrics_port is not None:
        resources["listeners"].append(metrics_listener(settings))
        resources["clusters"].append(admin_cluster(settings.admin_port))

    return config


def render_text(settings: EdgeSettings) -> str:
    return yaml.safe_dump(render(settings), sort_keys=False)
