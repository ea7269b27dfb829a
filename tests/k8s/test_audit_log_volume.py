"""The access-log volume that Envoy and the audit ingester share."""

import re

import pytest

from tests.k8s.manifests import OVERLAYS, REPO_ROOT, find, pod_spec, rendered


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingester_can_rotate_the_log(overlay):
    """Rotation renames and deletes files, so the mount must be writable."""
    spec = pod_spec(find(rendered(overlay), "Deployment", "envoy"))
    ingester = next(
        container
        # A sidecar: an init container that keeps running beside Envoy.
        for container in spec["initContainers"] + spec["containers"]
        if container["name"] == "audit-ingest"
    )
    mount = next(
        mount
        for mount in ingester["volumeMounts"]
        if mount["name"] == "access-log"
    )

    assert not mount.get("readOnly", False)


def test_documented_size_patch_targets_volume():
    """The sizeLimit patch in docs/deploy.md names the access-log volume."""
    text = (REPO_ROOT / "docs" / "deploy.md").read_text()
    [index] = set(
        re.findall(
            r"/spec/template/spec/volumes/(\d+)/emptyDir/sizeLimit", text
        )
    )
    volumes = pod_spec(find(rendered("prod"), "Deployment", "envoy"))[
        "volumes"
    ]

    assert "access-log" == volumes[int(index)]["name"]
    assert f"/spec/template/spec/volumes/{index}/name" in text
