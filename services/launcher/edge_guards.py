"""Load limits and guard routes that the edge applies before any service.

The overload manager and the global connection limit make a flood shed
load instead of exhausting memory. Guard routes reply to some requests in
Envoy itself, without the auth decision: a REST path called over gRPC
(404), a JSON body route given another content type (415) or a query
string (400), a query parameter given twice (400), any OPTIONS request
(CORS preflights included) and the public API description.
"""

import json
import re
import urllib.parse
from pathlib import Path

from services.common import methods

REPO_ROOT = Path(__file__).resolve().parents[2]
# The OpenAPI document that `make openapi` writes and the edge serves.
API_DESCRIPTION_FILE = REPO_ROOT / "docs" / "openapi.json"
API_DESCRIPTION_PATH = "/v1/openapi.json"
# Envoy caps a direct response's body at 4 KiB unless the route
# configuration raises it (max_direct_response_body_size_bytes).
MAX_DIRECT_RESPONSE_BYTES = 1024 * 1024

# Content types a JSON body route accepts, with or without parameters such
# as charset, in any letter case: application/json, and the form type that
# `curl -d` sends by default. The body must be JSON either way,
# and a cross-site HTML form cannot send the X-API-Key header.
JSON_CONTENT_TYPE = (
    r"(?i)^\s*application/(json|x-www-form-urlencoded)\s*(;.*)?$"
)
# Content types of gRPC and gRPC-Web: application/grpc, +proto and the
# like.
GRPC_CONTENT_TYPE = r"(?i)^\s*application/grpc(-web(-text)?)?(\+\w+)?(;.*)?$"
# A variable of a path template, such as `{key_id}`.
_PATH_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_.]*)")

# Client connections the edge accepts at most, when its open-file limit
# allows them (see connection_limit).
MAX_CONNECTIONS = 25_000
# File descriptors Envoy keeps for other than client connections: its
# listeners, connections to the services and the auth decision, the
# access log. NOTE: an estimate with a wide margin, not a measured count.
ENVOY_RESERVED_FILES = 1024

# Fraction of the heap maximum at which each overload action starts.
SHRINK_HEAP_AT = 0.90
STOP_REQUESTS_AT = 0.95
STOP_CONNECTIONS_AT = 0.98
# Between these fractions of the heap maximum, idle timeouts shrink
# linearly, down to the minimum percentage of their configured value.
REDUCE_TIMEOUTS_FROM = 0.80
REDUCE_TIMEOUTS_TO = 0.95
MIN_TIMEOUT_PERCENT = 10

_SKIP_AUTH = {
    "envoy.filters.http.ext_authz": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http"
        ".ext_authz.v3.ExtAuthzPerRoute",
        "disabled": True,
    }
}
_SKIP_TRANSCODER = {
    "envoy.filters.http.grpc_json_transcoder": {
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
        "disabled": True,
    }
}


def connection_limit(open_files: int) -> int:
    """Return the client connection limit that `open_files` descriptors
    leave room for.

    Past its open-file limit Envoy cannot accept a connection at all, so
    the overload manager's limit must come first. A small limit keeps at
    least half of the descriptors for clients.
    """
    reserved = min(ENVOY_RESERVED_FILES, open_files // 2)

    return max(min(MAX_CONNECTIONS, open_files - reserved), 1)


def overload_manager(max_heap_bytes: int, max_connections: int) -> dict:
    """Return the bootstrap's overload manager for the given limits.

    Past `max_connections` open downstream connections, Envoy closes each
    new one at once. As the heap nears `max_heap_bytes`, Envoy first
    returns freed memory to the system and shortens idle timeouts, then
    rejects new requests with 503, then stops accepting connections.
    """
    heap = "envoy.resource_monitors.fixed_heap"

    def at(fraction: float) -> list[dict]:
        return [{"name": heap, "threshold": {"value": fraction}}]

    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {
                "name": heap,
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions"
                    ".resource_monitors.fixed_heap.v3.FixedHeapConfig",
                    "max_heap_size_bytes": max_heap_bytes,
                },
            },
            {
                "name": "envoy.resource_monitors"
                ".global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions"
                    ".resource_monitors.downstream_connections.v3"
                    ".DownstreamConnectionsConfig",
                    "max_active_downstream_connections": max_connections,
                },
            },
        ],
        "actions": [
            {
                "name": "envoy.overload_actions.shrink_heap",
                "triggers": at(SHRINK_HEAP_AT),
            },
            {
                "name": "envoy.overload_actions.reduce_timeouts",
                "triggers": [
                    {
                        "name": heap,
                        "scaled": {
                            "scaling_threshold": REDUCE_TIMEOUTS_FROM,
                            "saturation_threshold": REDUCE_TIMEOUTS_TO,
                        },
                    }
                ],
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.config.overload.v3"
                    ".ScaleTimersOverloadActionConfig",
                    "timer_scale_factors": [
                        {
                            "timer": timer,
                            "min_scale": {"value": MIN_TIMEOUT_PERCENT},
                        }
                        for timer in (
                            "HTTP_DOWNSTREAM_CONNECTION_IDLE",
                            "HTTP_DOWNSTREAM_STREAM_IDLE",
                            "TRANSPORT_SOCKET_CONNECT",
                        )
                    ],
                },
            },
            {
                "name": "envoy.overload_actions.stop_accepting_requests",
                "triggers": at(STOP_REQUESTS_AT),
            },
            {
                "name": "envoy.overload_actions.stop_accepting_connections",
                "triggers": at(STOP_CONNECTIONS_AT),
            },
        ],
    }


def _direct_reply(name: str, match: dict, status: int, text: str) -> dict:
    return {
        "name": name,
        "match": match,
        # A local reply: local_reply_config renders it as JSON.
        "direct_response": {"status": status, "body": {"inline_string": text}},
        "typed_per_filter_config": _SKIP_AUTH | _SKIP_TRANSCODER,
    }


def _with_headers(match: dict, *headers: dict) -> dict:
    return {**match, "headers": match["headers"] + list(headers)}


def _query_parameter_names(method: methods.Method) -> list[tuple[str, ...]]:
    """Return the names of each field a query parameter can set.

    The transcoder takes a field by its JSON name or its proto name; the
    fields in the path template take no query parameter.
    """
    binding = method.http
    assert binding is not None and method.input_type is not None
    in_path = set(_PATH_VARIABLE.findall(binding.template))

    return [
        tuple(dict.fromkeys((field.json_name, field.name)))
        for field in method.input_type.fields
        if field.name not in in_path and not field.is_repeated
    ]


def _repeated_parameter_regex(names: tuple[str, ...]) -> str:
    """Return a regex of a :path that sets one field twice, by any of its
    `names`.

    RE2 has no back-references, so each field needs a regex of its own.
    Envoy's limit on regex program size also rules out one regex for all
    fields of a method.
    """
    name = "(?:" + "|".join(re.escape(item) for item in names) + ")"
    parameter = f"{name}(?:=[^&]*)?"

    return rf"[^?]*\?(?:[^&]*&)*{parameter}&(?:[^&]*&)*{parameter}(?:&.*)?"


def _guards(method: methods.Method) -> list[dict]:
    """Return the routes that reject bad requests to one REST binding."""
    binding = method.http
    assert binding is not None
    base = {
        "safe_regex": {"regex": binding.pattern.pattern},
        "headers": [
            {"name": ":method", "string_match": {"exact": binding.method}}
        ],
    }
    grpc = _with_headers(
        base,
        {
            "name": "content-type",
            "string_match": {"safe_regex": {"regex": GRPC_CONTENT_TYPE}},
        },
    )
    guards = [
        # NOTE: Envoy replies to an application/grpc request in gRPC's own
        # form (HTTP 200, grpc-status, no body) whatever the route says,
        # so a gRPC client gets 404's grpc-status: UNIMPLEMENTED.
        _direct_reply(
            f"{method.action}.grpc_rejected",
            grpc,
            404,
            f"{binding.method} {binding.template} is a REST path: gRPC "
            f"clients call {method.grpc_path}",
        )
    ]
    if not binding.body:
        for names in _query_parameter_names(method):
            regex = _repeated_parameter_regex(names)
            repeated = _with_headers(
                base,
                {
                    "name": ":path",
                    "string_match": {"safe_regex": {"regex": regex}},
                },
            )
            guards.append(
                _direct_reply(
                    f"{method.action}.repeated_query_rejected",
                    repeated,
                    400,
                    f"query parameter {names[0]} appears more than once: "
                    f"{binding.method} {binding.template} takes it once",
                )
            )

        return guards
    # :path carries the query string, which path matchers ignore.
    with_query = _with_headers(
        base, {"name": ":path", "string_match": {"contains": "?"}}
    )
    # An absent content type passes, so an empty POST needs none.
    not_json = _with_headers(
        base,
        {
            "name": "content-type",
            "string_match": {"safe_regex": {"regex": JSON_CONTENT_TYPE}},
            "invert_match": True,
        },
    )

    return guards + [
        _direct_reply(
            f"{method.action}.query_rejected",
            with_query,
            400,
            f"{binding.method} {binding.template} takes no query "
            "parameters: send every field in the JSON body",
        ),
        _direct_reply(
            f"{method.action}.content_type_rejected",
            not_json,
            415,
            f"{binding.method} {binding.template} takes a JSON body: "
            "send Content-Type: application/json",
        ),
    ]


def guard_routes() -> list[dict]:
    """Return the guard routes of every REST binding.

    These come before the API routes. Without them the transcoder would
    pass an application/grpc request to the service unchanged, and the
    client would get 200 with an empty body once the JSON route strips
    grpc-status. It would also parse a text/plain body as JSON and merge
    query parameters into the message behind the strict body check.
    """
    guards = []
    for method in methods.public_methods():
        if method.http is not None:
            guards += _guards(method)

    return guards


# Message encodings every service's gRPC server supports (grpcio).
GRPC_ENCODINGS = ("identity", "deflate", "gzip")


def grpc_encoding_route() -> dict:
    """Return the route that rejects a gRPC request in another encoding.

    A service fails such a call with INTERNAL, and with the Envoy 1.40 and
    grpcio 1.85 of this suite it then failed later calls on the same
    upstream connection too, until a call without the header came. The
    reply is UNIMPLEMENTED (Envoy's mapping of 404) with
    grpc-accept-encoding, as the compression guide on grpc.io describes.
    """
    names = "|".join(GRPC_ENCODINGS)
    route = _direct_reply(
        "grpc.encoding_rejected",
        {
            "prefix": "/",
            "grpc": {},
            "headers": [
                {
                    "name": "grpc-encoding",
                    "string_match": {"safe_regex": {"regex": f"({names})?"}},
                    "invert_match": True,
                }
            ],
        },
        404,
        "unsupported grpc-encoding: send messages in "
        f"{', '.join(GRPC_ENCODINGS)}, named in lower case",
    )
    route["response_headers_to_add"] = [
        {
            "header": {
                "key": "grpc-accept-encoding",
                "value": ",".join(GRPC_ENCODINGS),
            },
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]

    return route


# Checks, on routes that skip the auth decision, what the auth decision
# checks on the others: a header that cannot travel as gRPC metadata would
# make the service fail with INTERNAL.
HEADER_CHECK_SCRIPT = """
function envoy_on_request(request_handle)
  for name, value in pairs(request_handle:headers()) do
    if string.sub(name, 1, 1) ~= ":" and
        (string.find(name, "[^0-9a-z_.-]") or
         string.find(value, "[^\\32-\\126]")) then
      request_handle:respond({[":status"] = "400"},
        "invalid header: names may contain only a-z, 0-9, '-', '_' " ..
        "and '.', and values only printable ASCII")
      return
    end
  end
end
"""


def check_headers_without_auth(routes: list[dict]) -> None:
    """Add the header check to routes that forward without ext_authz."""
    for route in routes:
        filters = route.get("typed_per_filter_config", {})
        auth = filters.get("envoy.filters.http.ext_authz", {})
        if (
            "route" in route
            and auth.get("disabled")
            and "envoy.filters.http.lua" not in filters
        ):
            filters["envoy.filters.http.lua"] = {
                "@type": "type.googleapis.com/envoy.extensions.filters.http"
                ".lua.v3.LuaPerRoute",
                "source_code": {"inline_string": HEADER_CHECK_SCRIPT},
            }


# Rejects a request body on a route whose method takes none. Without it the
# transcoder would parse the body into the request message anyway: unknown
# fields would vanish, known ones would bypass the query string's checks,
# and a parse error would echo the body.
NO_BODY_SCRIPT = """
function envoy_on_request(request_handle)
  local body = request_handle:body()
  if body ~= nil and body:length() > 0 then
    request_handle:respond({[":status"] = "400"},
      "this method takes no request body: send its fields in the path " ..
      "and the query string")
  end
end
"""


def reject_request_body(route: dict) -> None:
    """Add the request body check to a route of a method without a body.

    A Lua script the route already runs on responses keeps running.
    """
    filters = route.setdefault("typed_per_filter_config", {})
    lua = filters.setdefault(
        "envoy.filters.http.lua",
        {
            "@type": "type.googleapis.com/envoy.extensions.filters.http"
            ".lua.v3.LuaPerRoute",
            "source_code": {"inline_string": ""},
        },
    )
    source = lua["source_code"]["inline_string"]
    if "envoy_on_request" in source:
        raise ValueError(
            f"route {route['name']} already checks requests in Lua: merge "
            "NO_BODY_SCRIPT into its script"
        )
    lua["source_code"]["inline_string"] = NO_BODY_SCRIPT + source


# Envoy's CORS filter ignores direct_response routes, so the OPTIONS route
# forwards to a cluster, and this script replies before the router does.
OPTIONS_SCRIPT = """
function envoy_on_request(request_handle)
  request_handle:respond({[":status"] = "404"},
    "no API method at OPTIONS: a CORS preflight needs an allowed " ..
    "Origin and Access-Control-Request-Method")
end
"""


def options_route(cluster: str) -> dict:
    """Return the route of every OPTIONS request, placed last.

    The CORS filter responds to preflights from allowed origins. Anything else
    gets 404 from a Lua script, without CORS headers, and neither reaches
    the auth decision nor `cluster`.
    """
    return {
        "name": "options",
        "match": {
            "prefix": "/",
            "headers": [
                {"name": ":method", "string_match": {"exact": "OPTIONS"}}
            ],
        },
        "route": {"cluster": cluster},
        "typed_per_filter_config": _SKIP_AUTH
        | _SKIP_TRANSCODER
        | {
            "envoy.filters.http.lua": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http"
                ".lua.v3.LuaPerRoute",
                "source_code": {"inline_string": OPTIONS_SCRIPT},
            }
        },
    }


def api_description_route(document: Path = API_DESCRIPTION_FILE) -> dict:
    """Return the public route serving the OpenAPI document.

    The document is embedded in the configuration, so a deployment needs
    no extra file beside Envoy's configuration.
    """
    if not document.is_file():
        raise FileNotFoundError(
            f"{document} is missing: run `make openapi` to generate it"
        )
    text = json.dumps(json.loads(document.read_text()), separators=(",", ":"))
    route = _direct_reply(
        "api_description",
        {
            "path": API_DESCRIPTION_PATH,
            "headers": [
                {"name": ":method", "string_match": {"exact": "GET"}},
                # A gRPC client would get the document as a grpc-message
                # header, which is too large for any client to read.
                {
                    "name": "content-type",
                    "string_match": {
                        "safe_regex": {"regex": GRPC_CONTENT_TYPE}
                    },
                    "invert_match": True,
                    "treat_missing_header_as_empty": True,
                },
            ],
        },
        200,
        text,
    )
    route["response_headers_to_add"] = [
        {
            "header": {"key": "content-type", "value": "application/json"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]

    return route


# A DNS name, an IPv4 address, or an IPv6 address (urlsplit strips the
# brackets).
_HOST = re.compile(
    r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$|^[0-9a-f.]*:[0-9a-f:.]*$"
)


def parse_cors_origins(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list of origins such as `https://a.example`.

    Raises ValueError naming the first invalid entry. An origin is a
    scheme, a host and an optional port, in lower case, with no path: the
    form browsers send in the Origin header, which Envoy matches exactly.
    """
    origins = []
    for raw in text.split(","):
        origin = raw.strip()
        if not origin:
            continue
        parsed = urllib.parse.urlsplit(origin)
        try:
            port = parsed.port
        except ValueError:
            port = -1
        valid = (
            parsed.scheme in ("https", "http")
            and origin == origin.lower()
            and _HOST.match(parsed.hostname or "") is not None
            and port != -1
            and not parsed.path
            and not parsed.query
            and not parsed.fragment
            and not parsed.username
        )
        if not valid:
            raise ValueError(
                f"invalid CORS origin {origin!r}: use the form "
                "https://host[:port] in lower case, without a path or '*'"
            )
        origins.append(origin)

    return tuple(dict.fromkeys(origins))
