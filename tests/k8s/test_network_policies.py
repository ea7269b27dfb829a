"""Network policies for name resolution, with and without a node cache."""

import os

import pytest
import yaml

from tests.k8s.manifests import (
    K8S,
    OVERLAYS,
    WORKLOAD_KINDS,
    find,
    pod_labels,
    render_text,
    rendered,
)

# NodeLocal DNSCache's address in its published manifests.
NODE_LOCAL_DNS = "169.254.20.10/32"
# The audit ingester's metrics port in Envoy's pods.
INGEST_METRICS_PORT = 9091
HTTPS_PORT = 443


def dns_peers(policy: dict) -> list[dict]:
    """Return the peers of the egress rules that open port 53 both ways."""
    peers = []
    for rule in policy["spec"]["egress"]:
        ports = {(entry["protocol"], entry["port"]) for entry in rule["ports"]}
        if {("UDP", 53), ("TCP", 53)} <= ports:
            peers += rule["to"]

    return peers


@pytest.mark.parametrize("overlay", OVERLAYS)
class TestDns:
    def test_every_pod_may_resolve(self, overlay):
        """allow-dns selects every pod of the namespace."""
        policy = find(rendered(overlay), "NetworkPolicy", "allow-dns")

        assert {} == policy["spec"]["podSelector"]
        assert ["Egress"] == policy["spec"]["policyTypes"]

    def test_cluster_dns_allowed(self, overlay):
        """The cluster's DNS pods in kube-system are reachable."""
        peers = dns_peers(
            find(rendered(overlay), "NetworkPolicy", "allow-dns")
        )

        assert {
            "namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
            },
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        } in peers

    def test_node_local_cache_allowed(self, overlay):
        """NodeLocal DNSCache's link-local address is reachable."""
        peers = dns_peers(
            find(rendered(overlay), "NetworkPolicy", "allow-dns")
        )

        assert {"ipBlock": {"cidr": NODE_LOCAL_DNS}} in peers


def selected_workloads(objects, policy: dict) -> list[str]:
    """Return the names of the workloads whose pods `policy` selects."""
    selector = policy["spec"]["podSelector"]
    names = []
    for item in objects:
        if item["kind"] not in WORKLOAD_KINDS:
            continue
        labels = pod_labels(item)
        required = selector.get("matchLabels", {})
        if any(labels.get(key) != value for key, value in required.items()):
            continue
        expressions = selector.get("matchExpressions", [])
        if any(
            labels.get(entry["key"]) not in entry["values"]
            for entry in expressions
        ):
            continue
        names.append(item["metadata"]["name"])

    return names


def rule_ports(rule: dict) -> set[int]:
    return {entry.get("port") for entry in rule.get("ports", [])}


def egress_ports(objects, workload: str) -> set[int]:
    """Return the ports that policies open for a workload's egress."""
    ports = set()
    for policy in objects:
        if policy["kind"] != "NetworkPolicy":
            continue
        if workload not in selected_workloads(objects, policy):
            continue
        for rule in policy["spec"].get("egress", []):
            ports |= rule_ports(rule)

    return ports


@pytest.mark.parametrize("overlay", OVERLAYS)
class TestNarrowRules:
    def test_ingester_metrics_only_on_envoy(self, overlay):
        """Port 9091, the audit ingester's, is open on Envoy's pods only."""
        objects = rendered(overlay)
        opened = [
            policy
            for policy in objects
            if policy["kind"] == "NetworkPolicy"
            and any(
                INGEST_METRICS_PORT in rule_ports(rule)
                for rule in policy["spec"].get("ingress", [])
            )
        ]

        assert [] != opened
        for policy in opened:
            name = policy["metadata"]["name"]
            assert ["envoy"] == selected_workloads(objects, policy), name

    def test_auth_has_no_https_egress(self, overlay):
        """Without the cds-hooks-jwks component auth reaches no HTTPS."""
        assert HTTPS_PORT not in egress_ports(rendered(overlay), "auth")


def test_jwks_component_opens_https_for_auth(tmp_path):
    """The cds-hooks-jwks component lets auth, and only auth, reach 443."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    prod = os.path.relpath(K8S / "overlays" / "prod", overlay)
    component = os.path.relpath(K8S / "components" / "cds-hooks-jwks", overlay)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"resources:\n- {prod}\n"
        f"components:\n- {component}\n"
    )
    objects = [
        item for item in yaml.safe_load_all(render_text(overlay)) if item
    ]
    policy = find(objects, "NetworkPolicy", "auth-jwks")

    assert HTTPS_PORT in egress_ports(objects, "auth")
    assert ["auth"] == selected_workloads(objects, policy)
    assert "arxio" == policy["metadata"]["namespace"]
