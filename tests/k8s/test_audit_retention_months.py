"""The audit service and the retention job agree on the retention period,
so that verify accepts the cuts that the job makes and no other."""

import pytest

from tests.k8s.manifests import OVERLAYS, find, pod_spec, rendered


def retention_months(workload: dict) -> str | None:
    [container] = [
        container
        for container in pod_spec(workload)["containers"]
        if any(
            entry["name"] == "ARXIO_AUDIT_RETENTION_MONTHS"
            for entry in container.get("env", [])
        )
    ]
    values = {entry["name"]: entry.get("value") for entry in container["env"]}

    return values["ARXIO_AUDIT_RETENTION_MONTHS"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_and_job_agree(overlay):
    objects = rendered(overlay)
    service = retention_months(find(objects, "StatefulSet", "audit"))
    job = retention_months(find(objects, "CronJob", "audit-retention"))

    assert service is not None
    assert service == job
