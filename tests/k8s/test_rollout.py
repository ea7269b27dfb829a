"""The order of a rollout: Argo CD sync waves and autoscaled replicas.

Argo CD applies the Sync phase wave by wave and waits for each wave to be
healthy before the next. A Sync hook runs in its wave like any object. The
migration Job must come after everything it needs and before every
workload that needs the migrated tables, or the sync deadlocks.
"""

import pytest

from tests.k8s.manifests import (
    OVERLAYS,
    WORKLOAD_KINDS,
    find,
    pod_labels,
    pod_spec,
    rendered,
)

WAVE = "argocd.argoproj.io/sync-wave"
HOOK = "argocd.argoproj.io/hook"
PHASE_LABEL = "arxio.io/deploy-phase"


def wave(item: dict) -> int:
    annotations = item["metadata"].get("annotations") or {}

    return int(annotations.get(WAVE, "0"))


def hook(item: dict) -> str | None:
    return (item["metadata"].get("annotations") or {}).get(HOOK)


def selects(selector: dict, labels: dict) -> bool:
    """Return whether a NetworkPolicy's podSelector selects `labels`."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        assert "In" == expression["operator"]
        if labels.get(expression["key"]) not in expression["values"]:
            return False

    return True


def name(item: dict) -> str:
    return f"{item['kind']}/{item['metadata']['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
class TestSyncWaves:
    def test_migration_is_sync_hook(self, overlay):
        """A Sync hook, not PreSync: PreSync would run before the database
        that the Sync phase creates."""
        job = find(rendered(overlay), "Job", "migrate")

        assert "Sync" == hook(job)

    def test_job_dependencies_come_first(self, overlay):
        """The namespace, the Job's ServiceAccount, the network policies
        that select its pods and the database are in earlier waves."""
        objects = rendered(overlay)
        job = find(objects, "Job", "migrate")
        labels = pod_labels(job)
        needed = [find(objects, "Namespace", "arxio")]
        needed.append(
            find(
                objects, "ServiceAccount", pod_spec(job)["serviceAccountName"]
            )
        )
        needed += [
            item
            for item in objects
            if item["kind"] == "NetworkPolicy"
            and selects(item["spec"]["podSelector"], labels)
        ]
        needed += [item for item in objects if item["kind"] == "Cluster"]
        late = [name(item) for item in needed if wave(item) >= wave(job)]

        assert len(needed) >= 5
        assert [] == late

    def test_workloads_come_after(self, overlay):
        """Every other workload waits for the migration."""
        objects = rendered(overlay)
        job = find(objects, "Job", "migrate")
        early = [
            name(item)
            for item in objects
            if item["kind"] in WORKLOAD_KINDS
            and item is not job
            and wave(item) <= wave(job)
        ]

        assert [] == early

    def test_model_pull_is_replaced_hook(self, overlay):
        """The pull Job is a Sync hook that Argo CD deletes before it runs
        again, in the StatefulSet's wave, which waits for the Job."""
        objects = rendered(overlay)
        job = find(objects, "Job", "ollama-pull")
        annotations = job["metadata"]["annotations"]
        statefulset = find(objects, "StatefulSet", "ollama")

        assert "Sync" == hook(job)
        assert (
            "BeforeHookCreation"
            == annotations["argocd.argoproj.io/hook-delete-policy"]
        )
        assert wave(statefulset) == wave(job)

    def test_waves_match_migrate_phase(self, overlay):
        """Objects before the Job are the ones `kubectl apply -l
        arxio.io/deploy-phase=migrate` applies, so both paths agree."""
        objects = rendered(overlay)
        job = find(objects, "Job", "migrate")
        labelled = {
            name(item)
            for item in objects
            if item["metadata"].get("labels", {}).get(PHASE_LABEL) == "migrate"
        }
        early = {name(item) for item in objects if wave(item) < wave(job)}

        assert labelled - {name(job)} == early


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaled_deployments_leave_replicas(overlay):
    """A Deployment that an autoscaler scales sets no replicas, which each
    apply would otherwise reset."""
    objects = rendered(overlay)
    targets = {
        item["spec"]["scaleTargetRef"]["name"]
        for item in objects
        if item["kind"] == "HorizontalPodAutoscaler"
    }
    fixed = [
        target
        for target in sorted(targets)
        if "replicas" in find(objects, "Deployment", target)["spec"]
    ]

    assert {"envoy", "auth", "cds"} <= targets
    assert [] == fixed
