"""Replies that the edge sends clients by itself, which services repeat.

Envoy's configuration (services/launcher/envoy_config.py) produces these
replies. The auth decision sends the same text for a body over the limit,
and the audit trail records the same gRPC codes for Envoy's own replies.
"""

# Largest request body the edge accepts on most routes.
MAX_REQUEST_BYTES = 64 * 1024

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
    # Envoy rejects HTTP/1.0 and any other version but 1.1 in an HTTP/1
    # request line (such as HTTP/2.0) with the same 426.
    426: "unsupported HTTP version: use HTTP/1.1, or HTTP/2 negotiated "
    "through TLS ALPN",
    # Envoy's own text names its internals (no healthy upstream, reset
    # reasons), so the client gets these instead.
    500: "internal error at the edge: retry, and report the X-Request-ID "
    "of the response if it persists",
    502: "the service sent an invalid response: retry, and report the "
    "X-Request-ID of the response if it persists",
    503: "the service is unavailable: retry shortly",
    504: "the service did not respond in time: retry shortly",
    431: "request headers too large: send at most 100 headers of at most "
    "32 KiB in total",
}


# The message of a reply when the auth service cannot be reached or
# cannot reach PostgreSQL.
AUTH_UNAVAILABLE_MESSAGE = "authorization is unavailable: retry shortly"
