"""Values only the operator knows ship as placeholders that fail loudly.

`python -m services.launcher.k8s_check` reports each one left in a
rendered overlay, and the billing service rejects its placeholder return
URL once Stripe is connected.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from services.billing.config import StripeConfig
from services.common.config import ConfigError, Environment
from services.launcher import k8s_check
from tests.k8s.manifests import (
    K8S,
    OVERLAYS,
    find,
    pod_spec,
    render_text,
    rendered,
    to_yaml,
)

# The settings an operator's overlay sets, as docs/deploy.md shows them.
OPERATOR_SETTINGS = """
configMapGenerator:
- name: arxio-edge
  behavior: merge
  literals:
  - ARXIO_BILLING_RETURN_URL=https://api.hospital.org/billing
patches:
- target:
    kind: Cluster
    name: arxio-db
  patch: |-
    - op: replace
      path: /spec/backup/barmanObjectStore/destinationPath
      value: s3://hospital-arxio-backups/arxio-db
- target:
    kind: Certificate
    name: arxio-tls-edge
  patch: |-
    - op: replace
      path: /spec/commonName
      value: api.hospital.org
    - op: replace
      path: /spec/dnsNames
      value: [api.hospital.org]
"""
DATABASE_ADDRESS = """
- target:
    kind: NetworkPolicy
    name: postgres-clients
  patch: |-
    - op: replace
      path: /spec/egress/0/to
      value:
      - ipBlock:
          cidr: 10.20.30.0/28
"""


def operator_overlay(tmp_path, base: str, components=(), extra="") -> list:
    """Render an overlay of `base` that sets every placeholder; a patch
    whose target `base` lacks changes nothing."""
    folder = tmp_path / "overlay"
    folder.mkdir()
    relative = os.path.relpath(K8S, folder)
    listed = "".join(
        f"- {relative}/components/{name}\n" for name in components
    )
    text = (
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"resources:\n- {relative}/overlays/{base}\n"
        + (f"components:\n{listed}" if components else "")
        + textwrap.dedent(OPERATOR_SETTINGS)
        + textwrap.dedent(extra).lstrip("\n")
    )
    (folder / "kustomization.yaml").write_text(text)

    return [item for item in yaml.safe_load_all(render_text(folder)) if item]


def messages(overlay: str) -> str:
    return "\n".join(k8s_check.placeholders(rendered(overlay)))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_return_url_reported(overlay):
    """Each shipped overlay still has the billing return URL to set."""
    assert "ARXIO_BILLING_RETURN_URL" in messages(overlay)


def test_database_address_reported():
    """The external database's address is left to the operator."""
    assert "TEST-NET-1" in messages("prod")


def test_backup_bucket_reported():
    """The CloudNativePG backup bucket is left to the operator."""
    assert "BUCKET_NOT_SET" in messages("cloudnativepg")


def test_edge_name_reported():
    """The edge certificate's DNS name is left to the operator."""
    assert "api.arxio.example" in messages("cert-manager")


def test_placeholder_bucket_cannot_exist():
    """The shipped bucket name breaks S3's naming rules, so no one can
    own it and receive the backups."""
    cluster = find(rendered("cloudnativepg"), "Cluster", "arxio-db")
    path = cluster["spec"]["backup"]["barmanObjectStore"]["destinationPath"]
    bucket = path.removeprefix("s3://").split("/")[0]

    assert k8s_check.S3_BUCKET.match(bucket) is None


def test_placeholder_return_url_fails_billing():
    """The billing service refuses to start with the shipped return URL
    once a Stripe key is set."""
    objects = rendered("prod")
    billing = pod_spec(find(objects, "Deployment", "billing"))
    entry = next(
        item
        for item in billing["containers"][0]["env"]
        if item["name"] == "ARXIO_BILLING_RETURN_URL"
    )
    config_map = find(
        objects, "ConfigMap", entry["valueFrom"]["configMapKeyRef"]["name"]
    )
    url = config_map["data"]["ARXIO_BILLING_RETURN_URL"]
    environment = Environment(
        {
            "STRIPE_API_KEY": "sk_test_1",
            "STRIPE_PRO_PRICE_ID": "price_1",
            "ARXIO_BILLING_RETURN_URL": url,
        }
    )

    with pytest.raises(ConfigError, match="placeholder"):
        StripeConfig.from_env(environment)


def test_operator_overlay_passes(tmp_path):
    """An overlay that sets every value has nothing left to report."""
    objects = operator_overlay(
        tmp_path, "cloudnativepg", components=("cert-manager",)
    )

    assert [] == k8s_check.placeholders(objects)


def test_external_database_overlay_passes(tmp_path):
    """With its database address set, the prod overlay passes."""
    objects = operator_overlay(tmp_path, "prod", extra=DATABASE_ADDRESS)

    assert [] == k8s_check.placeholders(objects)


@pytest.mark.parametrize(
    "url", ["https://localhost:8443/", "http://127.0.0.1/", ""]
)
def test_local_return_url_reported(url):
    """A return URL that names the pod itself, or falls back to it, is
    reported."""
    config_map = {
        "kind": "ConfigMap",
        "metadata": {"name": "arxio-edge"},
        "data": {"ARXIO_BILLING_RETURN_URL": url},
    }

    assert 1 == len(k8s_check.placeholders([config_map]))


def test_open_database_egress_reported():
    """PostgreSQL open to every address is reported."""
    policy = {
        "kind": "NetworkPolicy",
        "metadata": {"name": "postgres-clients"},
        "spec": {
            "egress": [
                {
                    "to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                    "ports": [{"protocol": "TCP", "port": 5432}],
                }
            ]
        },
    }

    found = k8s_check.placeholders([policy])

    assert 1 == len(found)
    assert "allows every address" in found[0]


def run_check(text: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.launcher.k8s_check"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_command_exit_codes(tmp_path):
    """The command exits 1 on the shipped overlay and 0 once set."""
    shipped = run_check(to_yaml(rendered("prod")))
    done = run_check(
        to_yaml(operator_overlay(tmp_path, "prod", extra=DATABASE_ADDRESS))
    )

    assert 1 == shipped.returncode
    assert "placeholder" in shipped.stdout
    assert 0 == done.returncode, done.stdout
