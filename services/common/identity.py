"""Identity headers the edge sets after the auth decision.

Envoy overwrites these on every request, so a client cannot choose them, and
only peers holding a certificate from the internal CA can reach a service.
"""

import grpc

ORG_ID_HEADER = "x-org-id"
KEY_ID_HEADER = "x-api-key-id"
REQUEST_ID_HEADER = "x-request-id"
# Scopes of the calling key, comma-separated.
SCOPES_HEADER = "x-api-key-scopes"
# The client address as the edge determined it, after its trusted proxy
# hops. The edge overwrites any value a client sends.
CLIENT_ADDRESS_HEADER = "x-arxio-client-address"
# Kind of credential the auth decision authenticated: "api_key",
# "operator" or "ehr_jwt" (a CDS Hooks JWT from a registered EHR).
PRINCIPAL_HEADER = "x-arxio-principal"
# Milliseconds the model review of a CDS Hooks call may take, from the
# organization's settings; absent or 0 means no model review.
HOOKS_MODEL_TIMEOUT_HEADER = "x-arxio-hooks-model-timeout-ms"


def metadata_value(context: grpc.aio.ServicerContext, name: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode()

    return ""


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    return metadata_value(context, REQUEST_ID_HEADER)


def caller_org_id(context: grpc.aio.ServicerContext) -> str:
    """Return the caller's org id, as only the auth decision sets it."""
    return metadata_value(context, ORG_ID_HEADER)
