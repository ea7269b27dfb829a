"""Baseline gRPC services of `make bench`, on the services' own server.

    python bench/stub_services.py echo-review RESPONSE_FILE
    python bench/stub_services.py empty-check

Each serves one RPC through `services.common.server.serve`. So it has the
real services' server builder, interceptor (peer check, one log line and
the metrics of each RPC), mutual TLS, health service and graceful stop.
It reads the same variables: ARXIO_PORT, ARXIO_TLS_CA, ARXIO_TLS_CERT,
ARXIO_TLS_KEY, ARXIO_METRICS_PORT and the rest of ServerConfig.

- echo-review implements ClinicalDecisionSupportService.ClinicalReview:
  it returns the ClinicalReviewResponse serialized in RESPONSE_FILE for
  every request, without validation, screening or model review. The
  harness records that file from the real service, so the edge transcodes
  a response of the same size.
- empty-check implements envoy.service.auth.v3.Authorization.Check and
  allows every request without reading it.
"""

import argparse
import sys
from pathlib import Path

from arxio.cds.v1 import cds_pb2, cds_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

# Run as a script from any folder: the services live in the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.config import Environment, ServerConfig  # noqa: E402
from services.common.server import (  # noqa: E402
    Registration,
    run_service,
    serve,
)


class EchoReviewServicer(cds_pb2_grpc.ClinicalDecisionSupportServiceServicer):
    """ClinicalReview that returns one recorded response."""

    def __init__(self, response: cds_pb2.ClinicalReviewResponse) -> None:
        self._response = response

    async def ClinicalReview(self, request, context):
        return self._response


class EmptyCheckServicer(external_auth_pb2_grpc.AuthorizationServicer):
    """Check that allows every request: a status of OK and nothing else."""

    async def Check(self, request, context):
        return external_auth_pb2.CheckResponse()


def echo_review(response_file: Path) -> Registration:
    response = cds_pb2.ClinicalReviewResponse.FromString(
        response_file.read_bytes()
    )

    return Registration(
        cds_pb2_grpc.add_ClinicalDecisionSupportServiceServicer_to_server,
        EchoReviewServicer(response),
        "arxio.cds.v1.ClinicalDecisionSupportService",
    )


def empty_check() -> Registration:
    return Registration(
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server,
        EmptyCheckServicer(),
        "envoy.service.auth.v3.Authorization",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    echo = commands.add_parser(
        "echo-review", help="serve ClinicalReview with a recorded response"
    )
    echo.add_argument(
        "response_file",
        type=Path,
        help="a serialized arxio.cds.v1.ClinicalReviewResponse",
    )
    commands.add_parser("empty-check", help="serve Check that allows all")
    args = parser.parse_args()
    if args.command == "echo-review":
        registration = echo_review(args.response_file)
    else:
        registration = empty_check()

    async def run() -> None:
        config = ServerConfig.from_env(Environment(), default_port=0)
        await serve(f"bench-{args.command}", config, [registration])

    run_service(f"bench-{args.command}", run)


if __name__ == "__main__":
    main()
