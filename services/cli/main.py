"""`arxio`: the operator's command line.

Prints pure JSON on stdout; errors go to stderr with a non-zero exit code.
Operator commands authenticate with the operator credential: from
ARXIO_OPERATOR_TOKEN when set, otherwise from the file `make run` writes in
the checkout's .run folder.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import grpc
from arxio.auth.v1 import (
    keys_pb2,
    operator_pb2,
    operator_pb2_grpc,
    organization_pb2,
)
from google.protobuf import json_format

CHECKOUT_RUN_DIR = Path(__file__).resolve().parents[2] / ".run"
DEADLINE = 10.0
PLANS = ("free", "pro", "enterprise")
SCOPES = tuple(
    name.lower()
    for name in keys_pb2.ApiKey.Scope.keys()
    if name != "SCOPE_UNSPECIFIED"
)


class CliError(Exception):
    pass


def operator_token() -> str:
    token = os.environ.get("ARXIO_OPERATOR_TOKEN", "").strip()
    if token:
        return token
    path = CHECKOUT_RUN_DIR / "operator-token"
    if path.exists():
        return path.read_text().strip()
    raise CliError(
        "no operator credential: set ARXIO_OPERATOR_TOKEN, or run `make run` "
        f"in the checkout so that {path} exists"
    )


def edge_address() -> str:
    address = os.environ.get("ARXIO_EDGE_ADDRESS", "").strip()
    if address:
        return address

    return f"localhost:{os.environ.get('ARXIO_EDGE_PORT', '8443')}"


def channel_credentials() -> grpc.ChannelCredentials:
    ca_file = os.environ.get("ARXIO_CA_FILE", "").strip()
    if not ca_file and (CHECKOUT_RUN_DIR / "certs" / "ca.crt").exists():
        ca_file = str(CHECKOUT_RUN_DIR / "certs" / "ca.crt")
    if not ca_file:
        # The system's trusted roots.
        return grpc.ssl_channel_credentials()

    return grpc.ssl_channel_credentials(Path(ca_file).read_bytes())


def _to_json(message) -> dict:
    return json_format.MessageToDict(message)


def _create_org(stub, args) -> dict:
    organization = stub.CreateOrganization(
        operator_pb2.CreateOrganizationRequest(
            name=args.name,
            plan=organization_pb2.Organization.Plan.Value(args.plan.upper()),
        ),
        **args.call,
    )

    return _to_json(organization)


def _list_orgs(stub, args) -> dict:
    reply = stub.ListOrganizations(
        operator_pb2.ListOrganizationsRequest(
            page_size=args.page_size, page_token=args.page_token
        ),
        **args.call,
    )

    return _to_json(reply)


def _create_key(stub, args) -> dict:
    reply = stub.CreateOrganizationKey(
        operator_pb2.CreateOrganizationKeyRequest(
            org_id=args.org,
            name=args.name,
            scopes=[
                keys_pb2.ApiKey.Scope.Value(scope.upper())
                for scope in args.scope
            ],
        ),
        **args.call,
    )

    return {"apiKey": reply.api_key, **_to_json(reply.key)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arxio", description="Operate an arxio deployment."
    )
    commands = parser.add_subparsers(dest="group", required=True)

    orgs = commands.add_parser("orgs", help="manage organizations")
    orgs_commands = orgs.add_subparsers(dest="command", required=True)
    create = orgs_commands.add_parser("create", help="create an organization")
    create.add_argument("--name", required=True, help="display name")
    create.add_argument("--plan", required=True, choices=PLANS)
    create.set_defaults(run=_create_org)
    listing = orgs_commands.add_parser("list", help="list organizations")
    listing.add_argument("--page-size", type=int, default=0)
    listing.add_argument("--page-token", default="")
    listing.set_defaults(run=_list_orgs)

    keys = commands.add_parser("keys", help="manage API keys")
    keys_commands = keys.add_subparsers(dest="command", required=True)
    create_key = keys_commands.add_parser(
        "create", help="create an API key; its secret is printed only once"
    )
    create_key.add_argument("--org", required=True, help="organization id")
    create_key.add_argument("--name", default="", help="label for people")
    create_key.add_argument(
        "--scope",
        action="append",
        default=[],
        choices=SCOPES,
        help="a scope of the key; repeat for several (default: all)",
    )
    create_key.set_defaults(run=_create_key)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.call = {
            "metadata": [("authorization", f"Bearer {operator_token()}")],
            "timeout": DEADLINE,
        }
        with grpc.secure_channel(
            edge_address(), channel_credentials()
        ) as channel:
            output = args.run(
                operator_pb2_grpc.OperatorServiceStub(channel), args
            )
    except CliError as error:
        print(f"arxio: {error}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:
        print(
            f"arxio: {error.code().name}: {error.details()} "
            f"(edge {edge_address()})",
            file=sys.stderr,
        )
        return 1
    json.dump(output, sys.stdout, indent=2)
    sys.stdout.write("\n")

    return 0


if __name__ == "__main__":
    raise SystemExit(main())
