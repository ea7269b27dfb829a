"""Report the settings of a rendered overlay still left at a placeholder.

    kubectl kustomize YOUR_OVERLAY | python -m services.launcher.k8s_check

The base and components under k8s/ ship placeholders where only the
operator knows the value, chosen so that none of them can work by
accident: a backup bucket name that S3 does not allow, a database address
in TEST-NET-1 (RFC 5737), return URLs under `.invalid` (RFC 2606). This
check fails on each of them, and on values that have no place in a
cluster (localhost return URLs, PostgreSQL open to every address), with the
fix for each. Exits 0 when none is left, 1 when one is and 2 when the input
cannot be read.
"""

import argparse
import ipaddress
import re
import sys
import urllib.parse
from collections.abc import Iterable, Sequence

import yaml

# RFC 5737's TEST-NET-1, the range of the base's database address.
PLACEHOLDER_NETWORK = ipaddress.ip_network("192.0.2.0/24")
# Names under these top-level domains are reserved (RFC 2606) and never
# resolve to a real server.
RESERVED_DOMAINS = ("invalid", "example", "test")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# Settings that hold a URL a browser or EHR opens from outside.
PUBLIC_URL_SETTINGS = (
    "ARXIO_BILLING_RETURN_URL",
    "ARXIO_BILLING_SUCCESS_URL",
    "ARXIO_BILLING_CANCEL_URL",
    "ARXIO_CDS_HOOKS_BASE_URL",
)
# Settings whose empty value makes the service fall back to a local
# default (billing's return URL falls back to https://localhost:8443/).
REQUIRED_URL_SETTINGS = ("ARXIO_BILLING_RETURN_URL",)
POSTGRES_PORT = 5432
# S3's rules for a bucket name: 3 to 63 lower-case letters, digits, dots
# and hyphens, beginning and ending with a letter or digit.
S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _name(item: dict) -> str:
    return f"{item['kind']}/{item['metadata']['name']}"


def _reserved(host: str) -> bool:
    return host.rstrip(".").rsplit(".", 1)[-1] in RESERVED_DOMAINS


def _url_problem(setting: str, value: str) -> str | None:
    if not value:
        if setting in REQUIRED_URL_SETTINGS:
            return (
                f"{setting} is empty, so the service falls back to "
                "localhost: set it to a page under the edge's public https "
                "address"
            )
        # Empty turns CDS Hooks JWT authentication off, and billing's
        # success and cancel pages fall back to its return URL.
        return None
    host = urllib.parse.urlsplit(value).hostname or ""
    if _reserved(host):
        return (
            f"{setting}={value!r} is a placeholder: set it to a page under "
            "the edge's public https address"
        )
    if host in LOOPBACK_HOSTS:
        return (
            f"{setting}={value!r} names this machine, which in a cluster is "
            "the pod: set it to the edge's public https address"
        )

    return None


def _containers(item: dict) -> list[dict]:
    spec = item.get("spec", {})
    if item["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    pod = spec.get("template", {}).get("spec", {})

    return pod.get("containers", []) + pod.get("initContainers", [])


def _url_settings(objects: Sequence[dict]) -> list[str]:
    found = []
    for item in objects:
        if item["kind"] == "ConfigMap":
            for setting, value in (item.get("data") or {}).items():
                if setting in PUBLIC_URL_SETTINGS:
                    problem = _url_problem(setting, value)
                    if problem:
                        found.append(f"{_name(item)}: {problem}")
        if item["kind"] in ("Deployment", "StatefulSet", "Job", "CronJob"):
            for container in _containers(item):
                for entry in container.get("env", []):
                    # A value from a ConfigMap is checked there.
                    if (
                        entry["name"] not in PUBLIC_URL_SETTINGS
                        or "value" not in entry
                    ):
                        continue
                    problem = _url_problem(entry["name"], entry["value"])
                    if problem:
                        found.append(
                            f"{_name(item)} container {container['name']}: "
                            f"{problem}"
                        )

    return found


def _backup_buckets(objects: Sequence[dict]) -> list[str]:
    found = []
    for item in objects:
        if item["kind"] != "Cluster":
            continue
        store = item["spec"].get("backup", {}).get("barmanObjectStore", {})
        path = store.get("destinationPath", "")
        parts = urllib.parse.urlsplit(path)
        if parts.scheme == "s3" and not S3_BUCKET.match(parts.netloc):
            found.append(
                f"{_name(item)}: backup destinationPath {path!r} names no "
                "valid S3 bucket (the shipped placeholder): set your "
                "bucket in your overlay"
            )

    return found


def _database_egress(objects: Sequence[dict]) -> list[str]:
    found = []
    for item in objects:
        if item["kind"] != "NetworkPolicy":
            continue
        for rule in item["spec"].get("egress", []):
            ports = {port.get("port") for port in rule.get("ports", [])}
            if POSTGRES_PORT not in ports:
                continue
            for peer in rule.get("to", []):
                cidr = peer.get("ipBlock", {}).get("cidr")
                if cidr is None:
                    continue
                network = ipaddress.ip_network(cidr, strict=False)
                if network.prefixlen == 0:
                    found.append(
                        f"{_name(item)}: PostgreSQL egress to {cidr} allows "
                        "every address: narrow it to your database's"
                    )
                elif network.version == 4 and network.subnet_of(
                    PLACEHOLDER_NETWORK
                ):
                    found.append(
                        f"{_name(item)}: PostgreSQL egress to {cidr} is the "
                        "placeholder (TEST-NET-1): set your database's "
                        "address range in your overlay"
                    )

    return found


def _certificate_names(objects: Sequence[dict]) -> list[str]:
    found = []
    for item in objects:
        if item["kind"] != "Certificate":
            continue
        for name in item["spec"].get("dnsNames", []):
            if _reserved(name):
                found.append(
                    f"{_name(item)}: DNS name {name!r} is a placeholder: "
                    "set the edge's public DNS name in your overlay"
                )

    return found


def placeholders(objects: Iterable[dict]) -> list[str]:
    """Return one message per setting still at a placeholder."""
    objects = [item for item in objects if item]

    return (
        _url_settings(objects)
        + _backup_buckets(objects)
        + _database_egress(objects)
        + _certificate_names(objects)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.launcher.k8s_check",
        description="Check rendered manifests (kubectl kustomize OVERLAY) "
        "for settings still at the placeholders that k8s/ ships.",
    )
    parser.add_argument(
        "file",
        nargs="?",
        default="-",
        help="rendered manifests; - or nothing reads standard input",
    )
    args = parser.parse_args(argv)
    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file, encoding="utf-8") as stream:
                text = stream.read()
        objects = list(yaml.safe_load_all(text))
    except (OSError, yaml.YAMLError) as error:
        print(f"error: cannot read the manifests: {error}", file=sys.stderr)
        return 2
    found = placeholders(objects)
    for message in found:
        print(message)
    if found:
        print(
            f"{len(found)} setting(s) left at a placeholder: see "
            "docs/deploy.md",
            file=sys.stderr,
        )
        return 1
    print(f"no placeholders among {len(objects)} objects")

    return 0


if __name__ == "__main__":
    sys.exit(main())
