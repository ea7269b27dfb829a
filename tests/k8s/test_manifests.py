"""Every overlay renders, and each object fits its schema and the policy."""

import copy

import kubernetes_validate
import pytest

from tests.k8s import crd_schemas
from tests.k8s.manifests import OVERLAYS, find, pod_spec, rendered
from tests.k8s.policy import violations

# The oldest Kubernetes that runs these manifests (native sidecars need
# 1.29) and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
NAMESPACE = "arxio"


def builtin_errors(item: dict, version: str) -> list[str]:
    try:
        kubernetes_validate.validate(item, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{item['kind']}/{item['metadata']['name']}: {error}"]

    return []


@pytest.mark.parametrize("overlay", OVERLAYS)
class TestOverlay:
    def test_objects_in_namespace(self, overlay):
        """Every namespaced object lands in the arxio namespace."""
        outside = [
            f"{item['kind']}/{item['metadata']['name']}"
            for item in rendered(overlay)
            if item["kind"] != "Namespace"
            and item["metadata"].get("namespace") != NAMESPACE
        ]

        assert [] == outside

    @pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
    def test_kubernetes_schemas(self, overlay, version):
        """Built-in kinds pass kubernetes-validate in strict mode."""
        found = []
        for item in rendered(overlay):
            if not crd_schemas.is_custom(item):
                found += builtin_errors(item, version)

        assert [] == found

    def test_custom_resource_schemas(self, overlay):
        """CloudNativePG and cert-manager kinds fit their CRD schemas."""
        found = []
        for item in rendered(overlay):
            if crd_schemas.is_custom(item):
                found += crd_schemas.errors(item)

        assert [] == found

    def test_policy(self, overlay):
        """Every workload follows the deployment policy."""
        assert [] == violations(rendered(overlay))


class TestOverlayDifferences:
    def test_prod_gives_ollama_a_gpu(self):
        """Only prod requests a GPU, one per Ollama pod."""
        for overlay, expected in (("prod", "1"), ("dev", None)):
            ollama = find(rendered(overlay), "StatefulSet", "ollama")
            limits = pod_spec(ollama)["containers"][0]["resources"]["limits"]

            assert expected == limits.get("nvidia.com/gpu"), overlay

    def test_private_endpoint_is_internal(self):
        """The private-endpoint Service requests an internal balancer."""
        service = find(rendered("private-endpoint"), "Service", "envoy")
        annotations = service["metadata"]["annotations"]

        assert (
            "internal"
            == annotations[
                "service.beta.kubernetes.io/aws-load-balancer-scheme"
            ]
        )
        assert (
            "Internal" == annotations["networking.gke.io/load-balancer-type"]
        )
        assert "10.0.0.0/8" in service["spec"]["loadBalancerSourceRanges"]

    def test_cloudnativepg_narrows_database_egress(self):
        """With CloudNativePG, services reach only the database pods."""
        policy = find(
            rendered("cloudnativepg"), "NetworkPolicy", "postgres-clients"
        )
        targets = policy["spec"]["egress"][0]["to"]

        assert [
            {"podSelector": {"matchLabels": {"cnpg.io/cluster": "arxio-db"}}}
        ] == targets

    def test_cloudnativepg_backups_encrypted(self):
        """Base backups and WAL go to the object store with AES-256."""
        cluster = find(rendered("cloudnativepg"), "Cluster", "arxio-db")
        store = cluster["spec"]["backup"]["barmanObjectStore"]

        assert "AES256" == store["data"]["encryption"]
        assert "AES256" == store["wal"]["encryption"]
        assert "arxio-encrypted" == cluster["spec"]["storage"]["storageClass"]

    def test_cert_manager_secret_layout(self):
        """cert-manager issues every TLS Secret that the pods mount."""
        objects = rendered("cert-manager")
        mounted = set()
        for item in objects:
            if item["kind"] not in ("Deployment", "StatefulSet"):
                continue
            for volume in pod_spec(item).get("volumes", []):
                if "secret" in volume:
                    mounted.add(volume["secret"]["secretName"])
                for source in volume.get("projected", {}).get("sources", []):
                    if "secret" in source:
                        mounted.add(source["secret"]["name"])
        issued = {
            item["spec"]["secretName"]
            for item in objects
            if item["kind"] == "Certificate"
        }
        tls_secrets = {
            name for name in mounted if name.startswith("arxio-tls")
        }

        assert tls_secrets <= issued

    def test_peer_names_match_services(self):
        """Envoy's client certificate carries the peer name "edge"."""
        envoy = find(
            rendered("cert-manager"), "Certificate", "arxio-tls-envoy"
        )

        assert "edge" == envoy["spec"]["commonName"]


class TestCustomResourceSchemas:
    def test_unknown_field_rejected(self):
        """A misspelt Cluster field fails the CloudNativePG schema."""
        cluster = copy.deepcopy(
            find(rendered("cloudnativepg"), "Cluster", "arxio-db")
        )
        cluster["spec"]["instance"] = cluster["spec"].pop("instances")

        found = crd_schemas.errors(cluster)

        assert 1 == len(found)
        assert "'instance' was unexpected" in found[0]

    def test_invalid_enum_rejected(self):
        """An encryption the CRD does not list fails the schema."""
        cluster = copy.deepcopy(
            find(rendered("cloudnativepg"), "Cluster", "arxio-db")
        )
        store = cluster["spec"]["backup"]["barmanObjectStore"]
        store["data"]["encryption"] = "AES128"

        assert 1 == len(crd_schemas.errors(cluster))
