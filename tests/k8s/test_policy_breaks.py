"""The policy check fails when a rendered workload breaks a rule."""

import copy

import pytest

from tests.k8s.manifests import find, pod_spec, rendered
from tests.k8s.policy import violations


def container(objects, kind: str, name: str) -> dict:
    return pod_spec(find(objects, kind, name))["containers"][0]


def writable_root(objects):
    security = container(objects, "Deployment", "auth")["securityContext"]
    del security["readOnlyRootFilesystem"]


def liveness_on_readiness(objects):
    probe = container(objects, "Deployment", "auth")["livenessProbe"]
    del probe["grpc"]["service"]


def short_grace(objects):
    pod_spec(find(objects, "Deployment", "billing"))[
        "terminationGracePeriodSeconds"
    ] = 10


def no_limits(objects):
    del container(objects, "Deployment", "cds")["resources"]["limits"]


def no_budget(objects):
    objects.remove(find(objects, "PodDisruptionBudget", "audit"))


def added_capability(objects):
    security = container(objects, "Deployment", "envoy")["securityContext"]
    security["capabilities"]["add"] = ["NET_ADMIN"]


def no_spread(objects):
    del pod_spec(find(objects, "Deployment", "envoy"))[
        "topologySpreadConstraints"
    ]


def no_part_of(objects):
    labels = find(objects, "Deployment", "billing")["metadata"]["labels"]
    del labels["app.kubernetes.io/part-of"]


def sidecar_as_root(objects):
    ingest = pod_spec(find(objects, "Deployment", "envoy"))["initContainers"]
    ingest[0]["securityContext"]["allowPrivilegeEscalation"] = True


def no_autoscaler(objects):
    objects.remove(find(objects, "HorizontalPodAutoscaler", "cds"))


def token_mounted(objects):
    pod_spec(find(objects, "StatefulSet", "ollama"))[
        "automountServiceAccountToken"
    ] = True


def no_network_policy(objects):
    objects.remove(find(objects, "NetworkPolicy", "cds"))


def latest_image(objects):
    container(objects, "CronJob", "audit-retention")["image"] = "arxio:latest"


def set_environment(container: dict, name: str, value: str) -> None:
    entry = next(e for e in container["env"] if e["name"] == name)
    entry["value"] = value


def shutdown_cuts_model_call(objects):
    set_environment(
        container(objects, "Deployment", "cds"),
        "ARXIO_SHUTDOWN_GRACE_SECONDS",
        "10",
    )


def ingest_drain_outlasts_grace(objects):
    ingest = pod_spec(find(objects, "Deployment", "envoy"))["initContainers"]
    set_environment(ingest[0], "ARXIO_AUDIT_DRAIN_SECONDS", "60")


BREAKS = [
    (writable_root, "Deployment/auth", "readOnlyRootFilesystem"),
    (liveness_on_readiness, "Deployment/auth", "depends on PostgreSQL"),
    (short_grace, "Deployment/billing", "termination grace period"),
    (no_limits, "Deployment/cds", "no cpu limits"),
    (no_budget, "StatefulSet/audit", "PodDisruptionBudget"),
    (added_capability, "Deployment/envoy", "capabilities add"),
    (no_spread, "Deployment/envoy", "topology spread"),
    (no_part_of, "Deployment/billing", "app.kubernetes.io/part-of"),
    (sidecar_as_root, "Deployment/envoy", "allowPrivilegeEscalation"),
    (no_autoscaler, "Deployment/cds", "HorizontalPodAutoscaler"),
    (token_mounted, "StatefulSet/ollama", "service account token"),
    (no_network_policy, "Deployment/cds", "NetworkPolicy"),
    (latest_image, "CronJob/audit-retention", "no pinned tag"),
    (shutdown_cuts_model_call, "Deployment/cds", "cuts off model reviews"),
    (ingest_drain_outlasts_grace, "Deployment/envoy", "termination grace"),
]


@pytest.mark.parametrize(
    ("mutate", "subject", "rule"),
    BREAKS,
    ids=[mutate.__name__ for mutate, _, _ in BREAKS],
)
def test_policy_reports_break(mutate, subject, rule):
    """A rendered prod object changed to break one rule fails the check."""
    objects = copy.deepcopy(list(rendered("prod")))
    mutate(objects)

    found = violations(objects)

    assert [] != found
    assert all(message.startswith(subject) for message in found), found
    assert any(rule in message for message in found), found
