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
from arxio.audit.v1 import audit_pb2, audit_pb2_grpc
from arxio.auth.v1 import (
    ehr_pb2,
    ehr_pb2_grpc,
    keys_pb2,
    operator_pb2,
    operator_pb2_grpc,
    organization_pb2,
)
from google.protobuf import duration_pb2, json_format
from google.rpc import error_details_pb2, status_pb2

from services.audit import chain
from services.common import certs

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


class TrailNotIntact(Exception):
    """An audit verification that found problems; its report is output."""

    def __init__(self, report: dict) -> None:
        super().__init__("the audit trail is not intact")
        self.report = report


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


def _get_org(stub, args) -> dict:
    return _to_json(
        stub.GetOrganization(
            operator_pb2.GetOrganizationRequest(org_id=args.org), **args.call
        )
    )


def _suspend_org(stub, args) -> dict:
    return _to_json(
        stub.SuspendOrganization(
            operator_pb2.SuspendOrganizationRequest(org_id=args.org),
            **args.call,
        )
    )


def _reactivate_org(stub, args) -> dict:
    return _to_json(
        stub.ReactivateOrganization(
            operator_pb2.ReactivateOrganizationRequest(org_id=args.org),
            **args.call,
        )
    )


def _set_plan(stub, args) -> dict:
    return _to_json(
        stub.SetOrganizationPlan(
            operator_pb2.SetOrganizationPlanRequest(
                org_id=args.org,
                plan=organization_pb2.Organization.Plan.Value(
                    args.plan.upper()
                ),
            ),
            **args.call,
        )
    )


def _set_allowlist(stub, args) -> dict:
    return _to_json(
        stub.SetIpAllowlist(
            operator_pb2.SetIpAllowlistRequest(
                org_id=args.org, cidrs=args.cidr
            ),
            **args.call,
        )
    )


def _verify_audit(stub, args) -> dict:
    result = stub.VerifyOrganizationAuditTrail(
        audit_pb2.VerifyOrganizationAuditTrailRequest(org_id=args.org),
        **args.call,
    )
    output = json_format.MessageToDict(
        result, always_print_fields_with_no_presence=True
    )
    if not result.intact:
        raise TrailNotIntact(output)

    return output


def _verify_export(args) -> dict:
    keys = {}
    for path in args.public_key:
        try:
            key = chain.load_public_key(Path(path).read_bytes())
        except (OSError, ValueError) as error:
            raise CliError(f"public key {path}: {error}") from None
        keys[chain.public_key_id(key)] = key
    try:
        with open(args.file, encoding="utf-8") as export:
            result = chain.verify_export(export, keys)
    except (OSError, ValueError) as error:
        raise CliError(f"{args.file}: {error}") from None
    output = {
        "chainId": str(result.chain_id),
        "intact": result.intact,
        "entriesChecked": result.entries_checked,
        "checkpointsChecked": result.checkpoints_checked,
        "firstSeq": result.first_seq,
        "lastSeq": result.last_seq,
        # The same keys as the standalone verifier and the API's
        # AuditVerification.Problem in JSON.
        "problems": [
            {
                "kind": problem.kind,
                "seq": problem.seq,
                "eventId": problem.event_id,
                "message": problem.message,
            }
            for problem in result.problems
        ],
        "unsignedEntries": result.unsigned_entries,
        "retentionMonths": result.retention_months,
    }
    if result.unsigned_since is not None:
        output["unsignedSince"] = chain.utc_text(result.unsigned_since)
    if not result.intact:
        raise TrailNotIntact(output)

    return output


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


def _register_ehr(stub, args) -> dict:
    return _to_json(
        stub.RegisterEhrIssuer(
            ehr_pb2.RegisterEhrIssuerRequest(
                org_id=args.org, issuer=args.issuer, jwks_url=args.jwks_url
            ),
            **args.call,
        )
    )


def _list_ehrs(stub, args) -> dict:
    return _to_json(
        stub.ListEhrIssuers(
            ehr_pb2.ListEhrIssuersRequest(org_id=args.org), **args.call
        )
    )


def _delete_ehr(stub, args) -> dict:
    return _to_json(
        stub.DeleteEhrIssuer(
            ehr_pb2.DeleteEhrIssuerRequest(
                org_id=args.org, issuer_id=args.issuer_id
            ),
            **args.call,
        )
    )


def _set_hooks_model_review(stub, args) -> dict:
    timeout = duration_pb2.Duration()
    timeout.FromMilliseconds(round(args.timeout * 1000))

    return _to_json(
        stub.SetCdsHooksSettings(
            ehr_pb2.SetCdsHooksSettingsRequest(
                org_id=args.org, model_review_timeout=timeout
            ),
            **args.call,
        )
    )


def _certs_dir(args) -> Path:
    path = Path(
        args.certs_dir
        or os.environ.get("ARXIO_CERTS_DIR", "").strip()
        or CHECKOUT_RUN_DIR / "certs"
    )
    if not (path / "edge.crt").is_file():
        raise CliError(
            f"no edge certificate in {path}: pass --certs-dir, set "
            "ARXIO_CERTS_DIR, or run `make certs`"
        )

    return path


def _edge_pins(args) -> dict:
    path = _certs_dir(args)
    if not (path / certs.BACKUP_EDGE_KEY).is_file():
        certs.ensure_certificates(path)
    pins = certs.edge_pins(path)

    return {
        "edge": {"pin": pins["edge"], "certificate": str(path / "edge.crt")},
        "backup": {
            "pin": pins["backup"],
            "key": str(path / certs.BACKUP_EDGE_KEY),
        },
    }


def _renew_edge_certificate(args) -> dict:
    path = _certs_dir(args)
    certs.renew_edge_certificate(path)

    return _edge_pins(args)


def _rotate_edge_key(args) -> dict:
    path = _certs_dir(args)
    certs.rotate_edge_key(path)

    return _edge_pins(args)


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """Return the field violations in an error's google.rpc.Status."""
    trailers = dict(error.trailing_metadata() or ())
    raw = trailers.get("grpc-status-details-bin")
    if not raw:
        return []
    status = status_pb2.Status.FromString(raw)
    violations = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations += [
                (violation.field, violation.description)
                for violation in bad_request.field_violations
            ]

    return violations


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arxio", description="Operate an arxio deployment."
    )
    # Commands without their own stub call the operator API.
    parser.set_defaults(stub=operator_pb2_grpc.OperatorServiceStub)
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
    for command, run, text in (
        ("get", _get_org, "show one organization"),
        ("suspend", _suspend_org, "suspend an organization: its keys get 403"),
        ("reactivate", _reactivate_org, "reactivate a suspended organization"),
    ):
        org_command = orgs_commands.add_parser(command, help=text)
        org_command.add_argument(
            "--org", required=True, help="organization id"
        )
        org_command.set_defaults(run=run)
    set_plan = orgs_commands.add_parser(
        "set-plan",
        help="change an organization's plan (next request on); leaving "
        "enterprise needs the IP allowlist removed first",
    )
    set_plan.add_argument("--org", required=True, help="organization id")
    set_plan.add_argument("--plan", required=True, choices=PLANS)
    set_plan.set_defaults(run=_set_plan)
    set_allowlist = orgs_commands.add_parser(
        "set-allowlist",
        help="replace an Enterprise organization's IP allowlist; without "
        "--cidr, remove it",
    )
    set_allowlist.add_argument("--org", required=True, help="organization id")
    set_allowlist.add_argument(
        "--cidr",
        action="append",
        default=[],
        help="an IPv4 or IPv6 range such as 203.0.113.0/24; repeat for "
        "several",
    )
    set_allowlist.set_defaults(run=_set_allowlist)

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

    ehr = commands.add_parser(
        "ehr", help="manage the EHRs that call CDS Hooks with signed JWTs"
    )
    ehr_commands = ehr.add_subparsers(dest="command", required=True)
    register = ehr_commands.add_parser(
        "register",
        help="trust an EHR's CDS Hooks JWTs as calls of an organization",
    )
    register.add_argument("--org", required=True, help="organization id")
    register.add_argument(
        "--issuer", required=True, help="the JWT iss value the EHR sends"
    )
    register.add_argument(
        "--jwks-url",
        required=True,
        help="https URL of the EHR's JWK Set (its public keys)",
    )
    register.set_defaults(
        run=_register_ehr, stub=ehr_pb2_grpc.EhrAccessServiceStub
    )
    list_ehrs = ehr_commands.add_parser(
        "list", help="list an organization's registered EHR issuers"
    )
    list_ehrs.add_argument("--org", required=True, help="organization id")
    list_ehrs.set_defaults(
        run=_list_ehrs, stub=ehr_pb2_grpc.EhrAccessServiceStub
    )
    delete_ehr = ehr_commands.add_parser(
        "delete", help="stop trusting an EHR issuer's JWTs"
    )
    delete_ehr.add_argument("--org", required=True, help="organization id")
    delete_ehr.add_argument(
        "--issuer-id", required=True, help="issuerId from `arxio ehr list`"
    )
    delete_ehr.set_defaults(
        run=_delete_ehr, stub=ehr_pb2_grpc.EhrAccessServiceStub
    )
    model_review = ehr_commands.add_parser(
        "set-model-review",
        help="turn the model review of an organization's CDS Hooks calls "
        "on (with a deadline) or off",
    )
    model_review.add_argument("--org", required=True, help="organization id")
    model_review.add_argument(
        "--timeout",
        type=float,
        required=True,
        help="seconds the model review may take, 0.1 to 10; 0 turns it off",
    )
    model_review.set_defaults(
        run=_set_hooks_model_review, stub=ehr_pb2_grpc.EhrAccessServiceStub
    )

    edge = commands.add_parser(
        "edge", help="the edge's certificate pins (no network access)"
    )
    edge_commands = edge.add_subparsers(dest="command", required=True)
    for command, run, text in (
        (
            "pins",
            _edge_pins,
            "print the SHA-256 pins of the edge key and of the backup key",
        ),
        (
            "renew-certificate",
            _renew_edge_certificate,
            "issue a new edge certificate for the same key (the pins stay "
            "valid); restart Envoy afterwards",
        ),
        (
            "rotate-key",
            _rotate_edge_key,
            "move the edge to the backup key and create a new backup key; "
            "restart Envoy afterwards",
        ),
    ):
        edge_command = edge_commands.add_parser(command, help=text)
        edge_command.add_argument(
            "--certs-dir",
            default="",
            help="folder of edge.crt, edge.key and edge-backup.key "
            "(default: ARXIO_CERTS_DIR, else the checkout's .run/certs)",
        )
        edge_command.set_defaults(run=run, stub=None)

    audit = commands.add_parser("audit", help="verify audit trails")
    audit_commands = audit.add_subparsers(dest="command", required=True)
    verify = audit_commands.add_parser(
        "verify",
        help="recompute an organization's chain against its signed "
        "checkpoints (exit code 3 when it is not intact)",
    )
    verify.add_argument(
        "--org",
        required=True,
        help="organization id, or 00000000-0000-0000-0000-000000000000 for "
        "requests rejected before their key was known",
    )
    verify.set_defaults(
        run=_verify_audit, stub=audit_pb2_grpc.AuditOperatorServiceStub
    )
    verify_export = audit_commands.add_parser(
        "verify-export",
        help="verify a file from GET /v1/audit:export offline, with no "
        "network access (exit code 3 when it is not intact)",
    )
    verify_export.add_argument("file", help="the NDJSON export")
    verify_export.add_argument(
        "--public-key",
        action="append",
        required=True,
        help="a PEM file of a checkpoint-signing key you trust (make run "
        "writes .run/audit-signing.pub); repeat for rotated keys",
    )
    verify_export.set_defaults(run=_verify_export, stub=None)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.stub is None:
            output = args.run(args)
        else:
            args.call = {
                "metadata": [("authorization", f"Bearer {operator_token()}")],
                "timeout": DEADLINE,
            }
            with grpc.secure_channel(
                edge_address(), channel_credentials()
            ) as channel:
                output = args.run(args.stub(channel), args)
    except CliError as error:
        print(f"arxio: {error}", file=sys.stderr)
        return 2
    except TrailNotIntact as failure:
        json.dump(failure.report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        print(f"arxio: {failure}", file=sys.stderr)
        return 3
    except grpc.RpcError as error:
        print(
            f"arxio: {error.code().name}: {error.details()} "
            f"(edge {edge_address()})",
            file=sys.stderr,
        )
        for field, description in field_violations(error):
            print(f"arxio: {field}: {description}", file=sys.stderr)
        return 1
    json.dump(output, sys.stdout, indent=2)
    sys.stdout.write("\n")

    return 0


if __name__ == "__main__":
    raise SystemExit(main())
