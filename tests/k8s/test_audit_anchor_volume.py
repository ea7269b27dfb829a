"""The audit service's anchor file lives on a persistent volume of each
pod, so that its record of signed checkpoints survives a restart."""

from pathlib import PurePosixPath

import pytest

from tests.k8s.manifests import OVERLAYS, find, pod_spec, rendered


def anchor_setup(overlay: str) -> tuple[dict, dict, str]:
    """Return the audit StatefulSet, its server container and the path of
    the anchor file."""
    audit = find(rendered(overlay), "StatefulSet", "audit")
    server = pod_spec(audit)["containers"][0]
    values = {entry["name"]: entry.get("value") for entry in server["env"]}

    return audit, server, values["ARXIO_AUDIT_ANCHOR_FILE"]


@pytest.mark.parametrize("overlay", OVERLAYS)
class TestAnchorVolume:
    def test_file_on_claimed_volume(self, overlay):
        """The file's folder is a writable mount of a claim template."""
        audit, server, path = anchor_setup(overlay)
        claims = {
            claim["metadata"]["name"]: claim
            for claim in audit["spec"]["volumeClaimTemplates"]
        }
        [mount] = [
            mount
            for mount in server["volumeMounts"]
            if PurePosixPath(path).parent == PurePosixPath(mount["mountPath"])
        ]

        assert mount["name"] in claims
        assert not mount.get("readOnly", False)
        assert ["ReadWriteOnce"] == claims[mount["name"]]["spec"][
            "accessModes"
        ]

    def test_file_not_on_pod_volume(self, overlay):
        """No emptyDir or Secret of the same name hides the claim."""
        audit, server, path = anchor_setup(overlay)
        pod_volumes = {
            volume["name"] for volume in pod_spec(audit).get("volumes", [])
        }
        claim_names = {
            claim["metadata"]["name"]
            for claim in audit["spec"]["volumeClaimTemplates"]
        }

        assert set() == pod_volumes & claim_names

    def test_claims_kept_on_delete(self, overlay):
        """Deleting or scaling down the StatefulSet keeps the files."""
        audit, _, _ = anchor_setup(overlay)
        policy = audit["spec"]["persistentVolumeClaimRetentionPolicy"]

        assert "Retain" == policy["whenDeleted"]
        assert "Retain" == policy["whenScaled"]

    def test_served_through_headless_service(self, overlay):
        """The StatefulSet's governing Service is the audit Service."""
        audit, _, _ = anchor_setup(overlay)
        service = find(rendered(overlay), "Service", "audit")

        assert "audit" == audit["spec"]["serviceName"]
        assert "None" == service["spec"]["clusterIP"]
