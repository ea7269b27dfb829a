"""Run a service as a `grpc.aio` server with mutual TLS, health, reflection,
one log line per RPC and a graceful stop on SIGTERM."""

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import psycopg
import sqlalchemy.exc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import metrics
from services.common.config import ConfigError, Environment, ServerConfig
from services.common.errors import abort
from services.common.identity import (
    KEY_ID_HEADER,
    ORG_ID_HEADER,
    REQUEST_ID_HEADER,
)
from services.common.logging import (
    configure_logging,
    end_rpc_fields,
    start_rpc_fields,
)
from services.common.tls import reloading_server_credentials

log = structlog.get_logger()

# Seconds between readiness checks of what a service depends on.
READINESS_INTERVAL = 2.0
# Health-check name that is SERVING from start until graceful shutdown,
# whatever the state of the database or the model: what liveness probes
# check. The server's own name ("") follows readiness instead.
LIVENESS_NAME = "liveness"
# After SIGTERM a server reports NOT_SERVING and keeps serving until no RPC
# has arrived for DRAIN_QUIET_SECONDS, or for at most MAX_DRAIN_SECONDS.
# Envoy's active health checks run every 2 s, and in the SIGTERM fault test
# Envoy stopped routing to a draining replica within 3 s. Envoy retries on
# another replica the requests that still meet a closed port.
DRAIN_QUIET_SECONDS = 1.0
MAX_DRAIN_SECONDS = 10.0
# Largest request message a service accepts, after decompression: a CDS
# Hooks call or a Stripe webhook, whose bodies the edge caps at 512 KiB
# (services/launcher/envoy_config.py), with room for the fields around
# them. Every other request is smaller: the edge caps it at 64 KiB, and
# the auth decision's Check request adds at most the request's 32 KiB of
# headers.
MAX_RECEIVE_MESSAGE_BYTES = 528 * 1024
# Largest request metadata a service accepts. The edge admits 32 KiB of
# request headers (max_request_headers_kb in envoy/envoy.yaml.tmpl) and
# forwards them with headers of its own and the auth decision's, which
# add well under 16 KiB. gRPC's default limit (16 KiB) turned requests
# that the edge accepted into RESOURCE_EXHAUSTED.
MAX_METADATA_BYTES = 80 * 1024


@dataclass(frozen=True)
class Registration:
    """One servicer and the function that adds it to a server."""

    add_to_server: Callable[[object, grpc.aio.Server], None]
    servicer: object
    # Full proto name, for example `arxio.audit.v1.AuditService`.
    service_name: str
    # Peers allowed to call this service, overriding the server's default.
    allowed_peers: frozenset[str] | None = None


@dataclass(frozen=True)
class DependencyHealth:
    """A health-check name whose status follows one optional dependency.

    The name starts NOT_SERVING and turns SERVING while `check` returns
    True. It does not change the status of the service's own names, so a
    service can stay SERVING without a dependency it can work around.
    """

    # Name clients pass to Health.Check, for example
    # `arxio.cds.v1.ClinicalDecisionSupportService/model`.
    name: str
    check: Callable[[], Awaitable[bool]]
    # Seconds between checks.
    interval: float = READINESS_INTERVAL


# go-grpc-prometheus's `grpc_type` label of each kind of method handler.
RPC_TYPES = {
    "unary_unary": "unary",
    "stream_unary": "client_stream",
    "unary_stream": "server_stream",
    "stream_stream": "bidi_stream",
}

INTERNAL_ERROR_MESSAGE = (
    "internal error: the service failed on this request; retry, and report "
    "the X-Request-ID of the response if it persists"
)


DATABASE_OUTAGE_MESSAGE = "the database is unavailable: retry shortly"


def _is_database_outage(error: BaseException) -> bool:
    """Tell whether an error means PostgreSQL cannot be reached right now."""
    if isinstance(
        error,
        (
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.InterfaceError,
            sqlalchemy.exc.TimeoutError,
            psycopg.OperationalError,
            psycopg.InterfaceError,
            ConnectionError,
        ),
    ):
        return True
    if isinstance(error, sqlalchemy.exc.DBAPIError):
        return bool(error.connection_invalidated)

    return False


def _peer_name(context: grpc.aio.ServicerContext) -> str:
    names = context.auth_context().get("x509_common_name") or [b""]

    return names[0].decode()


def _metadata(metadata) -> dict[str, str]:
    """Return the ids of a call's metadata that its log lines carry."""
    wanted = (REQUEST_ID_HEADER, ORG_ID_HEADER, KEY_ID_HEADER)
    found = {}
    for key, value in metadata or ():
        if key in wanted and isinstance(value, str):
            found[key.removeprefix("x-").replace("-", "_")] = value

    return found


class ServingInterceptor(grpc.aio.ServerInterceptor):
    """Allow only known peers; log one summary line per unary-response RPC."""

    def __init__(
        self, default_peers: frozenset[str], registrations: Sequence
    ) -> None:
        self._default_peers = default_peers
        self._peers_by_service = {
            registration.service_name: registration.allowed_peers
            for registration in registrations
            if registration.allowed_peers is not None
        }
        # time.monotonic() of the last RPC other than health and
        # reflection, which a draining server waits to fall quiet.
        self.last_rpc_started = 0.0
        # Each method's handler and its wrapper.
        self._wrapped: dict[str, tuple] = {}

    def _allowed_peers(self, method: str) -> frozenset[str] | None:
        service = method.lstrip("/").split("/", 1)[0]
        if service.startswith("grpc."):
            # Health and reflection: any holder of an internal certificate.
            return None

        return self._peers_by_service.get(service, self._default_peers)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        if not method.startswith("/grpc."):
            self.last_rpc_started = time.monotonic()
        # A method's handler is the same object on every call, so its
        # wrapper is built once.
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(method, handler))
            self._wrapped[method] = cached

        return cached[1]

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler):
        """Return `handler` with the peer check, log line and metrics."""
        allowed = self._allowed_peers(method)

        async def check_peer(context) -> None:
            peer = _peer_name(context)
            if allowed is not None and peer not in allowed:
                log.warning("rpc.peer_rejected", peer=peer, method=method)
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"peer {peer!r} may not call {method}",
                )

        def unary_response(inner, rpc_type: str):
            async def behavior(request, context):
                started = time.perf_counter()
                ids = _metadata(context.invocation_metadata())
                fields = start_rpc_fields(method=method, **ids)
                code = grpc.StatusCode.OK
                try:
                    await check_peer(context)

                    return await inner(request, context)
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception as error:
                    code = context.code()
                    if code not in (None, grpc.StatusCode.OK):
                        raise
                    if _is_database_outage(error):
                        code = grpc.StatusCode.UNAVAILABLE
                        log.error(
                            "rpc.database_unavailable",
                            error=type(error).__name__,
                        )
                        await abort(context, code, DATABASE_OUTAGE_MESSAGE)
                    # A bug, not a decision: the client gets a fixed message
                    # and the request id, never the exception's text.
                    code = grpc.StatusCode.INTERNAL
                    log.exception("rpc.failed")
                    await abort(context, code, INTERNAL_ERROR_MESSAGE)
                finally:
                    if context.code() not in (None, grpc.StatusCode.OK):
                        code = context.code()
                    elapsed = time.perf_counter() - started
                    log.info(
                        "rpc",
                        code=code.name,
                        duration_ms=round(elapsed * 1000, 2),
                    )
                    metrics.observe_rpc(method, rpc_type, code.name, elapsed)
                    end_rpc_fields(fields)

            return behavior

        def streaming_response(inner, rpc_type: str):
            async def behavior(request, context):
                started = time.perf_counter()
                code = grpc.StatusCode.OK
                await check_peer(context)
                try:
                    result = inner(request, context)
                    if hasattr(result, "__aiter__"):
                        async for response in result:
                            yield response
                    else:
                        # A handler that writes with context.write().
                        await result
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception:
                    if context.code() not in (None, grpc.StatusCode.OK):
                        raise
                    code = grpc.StatusCode.INTERNAL
                    log.exception(
                        "rpc.failed",
                        method=method,
                        **_metadata(context.invocation_metadata()),
                    )
                    await abort(
                        context,
                        grpc.StatusCode.INTERNAL,
                        INTERNAL_ERROR_MESSAGE,
                    )
                finally:
                    if context.code() not in (None, grpc.StatusCode.OK):
                        code = context.code()
                    metrics.observe_rpc(
                        method,
                        rpc_type,
                        code.name,
                        time.perf_counter() - started,
                    )

            return behavior

        wrappers = {
            "unary_unary": (
                unary_response,
                grpc.unary_unary_rpc_method_handler,
            ),
            "stream_unary": (
                unary_response,
                grpc.stream_unary_rpc_method_handler,
            ),
            "unary_stream": (
                streaming_response,
                grpc.unary_stream_rpc_method_handler,
            ),
            "stream_stream": (
                streaming_response,
                grpc.stream_stream_rpc_method_handler,
            ),
        }
        for kind, (wrap, build) in wrappers.items():
            inner = getattr(handler, kind)
            if inner is not None:
                return build(
                    wrap(inner, RPC_TYPES[kind]),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )

        return handler


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    """Build mutual-TLS server credentials that follow renewed files.

    New connections get the certificate and CA that the files contain at
    their handshake (see services/common/tls.py).
    """
    return reloading_server_credentials(config.tls)


def channel_credentials(config: ServerConfig) -> grpc.ChannelCredentials:
    """Build client credentials for calling another service over mTLS."""
    tls = config.tls

    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca_file.read_bytes(),
        private_key=tls.key_file.read_bytes(),
        certificate_chain=tls.cert_file.read_bytes(),
    )


async def _watch_readiness(
    servicer: health.aio.HealthServicer,
    names: Sequence[str],
    check_ready: Callable[[], Awaitable[bool]],
    stopping: asyncio.Event,
    interval: float = READINESS_INTERVAL,
) -> None:
    serving = None
    while not stopping.is_set():
        try:
            ready = await check_ready()
        except Exception as error:
            ready = False
            log.warning(
                "readiness.check_failed", names=list(names), error=repr(error)
            )
        if ready != serving:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ready
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in names:
                await servicer.set(name, status)
            log.info("readiness.changed", names=list(names), serving=ready)
            serving = ready
        try:
            await asyncio.wait_for(stopping.wait(), interval)
        except TimeoutError:
            pass


async def _drain(interceptor: ServingInterceptor) -> None:
    """Wait until no RPC arrived for DRAIN_QUIET_SECONDS, or the maximum."""
    started = time.monotonic()
    while True:
        now = time.monotonic()
        quiet_for = now - interceptor.last_rpc_started
        if quiet_for >= DRAIN_QUIET_SECONDS:
            break
        if now - started >= MAX_DRAIN_SECONDS:
            log.warning("server.drain_timed_out", seconds=MAX_DRAIN_SECONDS)
            break
        await asyncio.sleep(DRAIN_QUIET_SECONDS - quiet_for)
    log.info("server.drained", seconds=round(time.monotonic() - started, 2))


async def _start_probe_server(
    config: ServerConfig, health_servicer: health.aio.HealthServicer
) -> grpc.aio.Server | None:
    """Serve `health_servicer` alone on the plaintext health port, if set.

    It shares the statuses of the main server's health service, and no
    other service is reachable on it.
    """
    if config.health_port is None:
        return None
    probe_server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probe_server)
    address = f"{config.host}:{config.health_port}"
    if probe_server.add_insecure_port(address) == 0:
        raise RuntimeError(
            f"failed to bind the health port {address}: is the port in use?"
        )
    await probe_server.start()
    log.info("server.health_port_started", address=address)

    return probe_server


async def serve(
    name: str,
    config: ServerConfig,
    registrations: Sequence[Registration],
    check_ready: Callable[[], Awaitable[bool]] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    dependencies: Sequence[DependencyHealth] = (),
) -> None:
    """Serve until SIGTERM or SIGINT, then drain and stop.

    On the signal every health name turns NOT_SERVING and the server keeps
    serving until new RPCs stop arriving (see DRAIN_QUIET_SECONDS). Then
    in-flight RPCs get the configured grace to finish.

    `check_ready` sets the health of the server ("") and of every
    registered service. Each of `dependencies` sets only its own name.
    Prometheus metrics are served on ARXIO_METRICS_PORT when it is set.
    """
    metrics_server = metrics.start_metrics_server(
        metrics.MetricsConfig.from_env(Environment())
    )
    interceptor = ServingInterceptor(config.allowed_peers, registrations)
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    for registration in registrations:
        registration.add_to_server(registration.servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = ["", *(r.service_name for r in registrations)]
    reflection.enable_server_reflection(
        [*names[1:], health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"{config.host}:{config.port}"
    bound = server.add_secure_port(address, server_credentials(config))
    if bound == 0:
        raise RuntimeError(f"failed to bind {address}: is the port in use?")

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    await server.start()
    log.info("server.started", address=f"{config.host}:{bound}")
    await health_servicer.set(
        LIVENESS_NAME, health_pb2.HealthCheckResponse.SERVING
    )
    probe_server = await _start_probe_server(config, health_servicer)
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    if check_ready is None:
        for service_name in names:
            await health_servicer.set(
                service_name, health_pb2.HealthCheckResponse.SERVING
            )
        watcher = None
    else:
        for service_name in names:
            await health_servicer.set(service_name, not_serving)
        watcher = asyncio.create_task(
            _watch_readiness(health_servicer, names, check_ready, stopping)
        )
    dependency_watchers = []
    for dependency in dependencies:
        await health_servicer.set(dependency.name, not_serving)
        dependency_watchers.append(
            asyncio.create_task(
                _watch_readiness(
                    health_servicer,
                    [dependency.name],
                    dependency.check,
                    stopping,
                    dependency.interval,
                )
            )
        )

    await stopping.wait()
    log.info("server.stopping", grace_seconds=config.shutdown_grace)
    await health_servicer.enter_graceful_shutdown()
    if watcher is not None:
        await watcher
    for dependency_watcher in dependency_watchers:
        await dependency_watcher
    await _drain(interceptor)
    await server.stop(config.shutdown_grace)
    if probe_server is not None:
        await probe_server.stop(0)
    if on_stop is not None:
        await on_stop()
    if metrics_server is not None:
        metrics_server.stop()
    log.info("server.stopped")


def run_service(name: str, main: Callable[[], Awaitable[None]]) -> None:
    """Run a service's `main` with logging; exit 2 on invalid settings."""
    configure_logging(name)
    try:
        asyncio.run(main())
    except ConfigError as error:
        log.error("server.config_invalid", error=str(error))
        raise SystemExit(2) from None
