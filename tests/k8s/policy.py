"""The deployment policy that every rendered workload must follow.

`violations(objects)` returns one message per breach, naming the object,
the container where there is one, and the rule. The rules:

- labels: `app`, `app.kubernetes.io/name` and `app.kubernetes.io/part-of`
  on each workload and its pods;
- a ServiceAccount of its own, with no API token mounted;
- pods run as a non-root user (uid 10000 or above) with the runtime's
  default seccomp profile and no host namespaces;
- every container, sidecars included: CPU and memory requests and limits,
  a read-only root filesystem, no privilege escalation, all capabilities
  dropped and none added, a pinned image tag;
- long-running main containers: readiness and liveness probes and a
  preStop hook (the audit ingester, a sidecar with no endpoint, has no
  probes). A container with a `grpc` port is probed over gRPC on its health
  port, liveness on the `liveness` name (never the readiness name "", which
  follows PostgreSQL);
- a termination grace period longer than the longest preStop pause plus
  the server's own shutdown (its drain, at most MAX_DRAIN_SECONDS, then
  ARXIO_SHUTDOWN_GRACE_SECONDS for the RPCs in flight) plus 5 s, and plus
  the native sidecars' preStop pauses and ARXIO_AUDIT_DRAIN_SECONDS, which
  start once the main containers have exited;
- a server that calls the model (ARXIO_MODEL_TIMEOUT_SECONDS) gives the
  RPCs in flight at shutdown at least that timeout plus 5 s;
- Deployments, and StatefulSets that serve gRPC (the audit service):
  topology spread over zones and nodes, a PodDisruptionBudget; envoy,
  auth and cds also a HorizontalPodAutoscaler;
- a Service whose pods serve gRPC names that port `grpc`;
- a NetworkPolicy of its own besides the namespace's deny-all;
- Jobs: a backoff limit and a deadline.
"""

import re

from services.audit.ingest import DEFAULT_DRAIN_SECONDS
from services.common.server import MAX_DRAIN_SECONDS
from tests.k8s.manifests import WORKLOAD_KINDS, pod_labels, pod_spec

REQUIRED_LABELS = ("app", "app.kubernetes.io/name")
PART_OF = ("app.kubernetes.io/part-of", "arxio")
MIN_UID = 10000
LIVENESS_NAME = "liveness"
AUTOSCALED = ("envoy", "auth", "cds")
# Seconds between the end of the server's drain and the kubelet's SIGKILL.
GRACE_MARGIN = 5
# The audit ingester's drain when ARXIO_AUDIT_DRAIN_SECONDS is unset.
INGEST_DRAIN_DEFAULT_SECONDS = DEFAULT_DRAIN_SECONDS
_PYTHON_SLEEP = re.compile(r"time\.sleep\((\d+(?:\.\d+)?)\)")


def _name(item: dict) -> str:
    return f"{item['kind']}/{item['metadata']['name']}"


def _selects(selector: dict, labels: dict) -> bool:
    """Return whether a label selector selects `labels`.

    `selector` is a LabelSelector (matchLabels, and matchExpressions with
    the In operator) or a Service's plain label map. An empty selector
    selects nothing here, so the deny-all policy counts for no workload.
    """
    if "matchLabels" in selector or "matchExpressions" in selector:
        match = selector.get("matchLabels", {})
        expressions = selector.get("matchExpressions", [])
    else:
        match, expressions = selector, []
    if not match and not expressions:
        return False
    for key, value in match.items():
        if labels.get(key) != value:
            return False
    for expression in expressions:
        if expression["operator"] != "In":
            return False
        if labels.get(expression["key"]) not in expression["values"]:
            return False

    return True


def pre_stop_seconds(container: dict) -> float:
    """Return the pause of a container's preStop hook, 0 without one."""
    command = (
        container.get("lifecycle", {})
        .get("preStop", {})
        .get("exec", {})
        .get("command", [])
    )
    if len(command) == 2 and command[0] == "sleep":
        return float(command[1])
    pauses = _PYTHON_SLEEP.findall(" ".join(command))

    return sum(float(pause) for pause in pauses)


def _environment(container: dict) -> dict[str, str]:
    return {
        entry["name"]: entry["value"]
        for entry in container.get("env", [])
        if "value" in entry
    }


def _check_labels(item: dict) -> list[str]:
    found = []
    for where, labels in (
        ("metadata", item["metadata"].get("labels", {})),
        ("pod template", pod_labels(item)),
    ):
        for label in REQUIRED_LABELS:
            if not labels.get(label):
                found.append(f"{_name(item)}: {where} label {label} missing")
        if labels.get(PART_OF[0]) != PART_OF[1]:
            found.append(
                f"{_name(item)}: {where} label {PART_OF[0]}={PART_OF[1]} "
                "missing"
            )

    return found


def _check_pod(item: dict, objects) -> list[str]:
    spec = pod_spec(item)
    found = []
    account = spec.get("serviceAccountName")
    accounts = {
        other["metadata"]["name"]
        for other in objects
        if other["kind"] == "ServiceAccount"
    }
    if account is None or account == "default" or account not in accounts:
        found.append(f"{_name(item)}: no ServiceAccount of its own")
    if spec.get("automountServiceAccountToken") is not False:
        found.append(f"{_name(item)}: mounts a service account token")
    security = spec.get("securityContext", {})
    if security.get("runAsNonRoot") is not True:
        found.append(f"{_name(item)}: pod runAsNonRoot is not true")
    if security.get("runAsUser", 0) < MIN_UID:
        found.append(f"{_name(item)}: pod runAsUser is below {MIN_UID}")
    if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        found.append(
            f"{_name(item)}: pod seccompProfile is not RuntimeDefault"
        )
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            found.append(f"{_name(item)}: pod uses {host}")

    return found


def _check_container(item: dict, container: dict) -> list[str]:
    where = f"{_name(item)} container {container['name']}"
    found = []
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in resources.get(kind, {}):
                found.append(f"{where}: no {resource} {kind}")
    security = container.get("securityContext", {})
    if security.get("readOnlyRootFilesystem") is not True:
        found.append(f"{where}: readOnlyRootFilesystem is not true")
    if security.get("allowPrivilegeEscalation") is not False:
        found.append(f"{where}: allowPrivilegeEscalation is not false")
    if security.get("privileged"):
        found.append(f"{where}: privileged")
    capabilities = security.get("capabilities", {})
    if "ALL" not in capabilities.get("drop", []):
        found.append(f"{where}: capabilities do not drop ALL")
    if capabilities.get("add"):
        found.append(f"{where}: capabilities add {capabilities['add']}")
    image = container.get("image", "")
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    if not tag or tag == "latest":
        found.append(f"{where}: image {image!r} has no pinned tag")

    return found


def _check_probes(item: dict, container: dict) -> list[str]:
    where = f"{_name(item)} container {container['name']}"
    found = []
    readiness = container.get("readinessProbe")
    liveness = container.get("livenessProbe")
    if readiness is None:
        found.append(f"{where}: no readinessProbe")
    if liveness is None:
        found.append(f"{where}: no livenessProbe")
    if "preStop" not in container.get("lifecycle", {}):
        found.append(f"{where}: no preStop hook")
    ports = {port.get("name") for port in container.get("ports", [])}
    if "grpc" not in ports or readiness is None or liveness is None:
        return found
    if "grpc" not in readiness or "grpc" not in liveness:
        found.append(f"{where}: a gRPC server is not probed over gRPC")
        return found
    if liveness["grpc"].get("service") != LIVENESS_NAME:
        found.append(
            f"{where}: liveness checks {liveness['grpc'].get('service', '')!r}"
            f", not {LIVENESS_NAME!r}, so it depends on PostgreSQL"
        )
    if readiness["grpc"].get("service", "") != "":
        found.append(f"{where}: readiness does not check the server's name")

    return found


def _check_grace(item: dict) -> list[str]:
    spec = pod_spec(item)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    needed = 0.0
    for container in spec.get("containers", []):
        environment = _environment(container)
        shutdown = 0.0
        if "ARXIO_SHUTDOWN_GRACE_SECONDS" in environment:
            grace_seconds = float(environment["ARXIO_SHUTDOWN_GRACE_SECONDS"])
            shutdown = MAX_DRAIN_SECONDS + grace_seconds
        needed = max(needed, pre_stop_seconds(container) + shutdown)
    # Native sidecars stop after the main containers, so their pauses and
    # the audit ingester's drain add.
    for container in spec.get("initContainers", []):
        if container.get("restartPolicy") == "Always":
            needed += pre_stop_seconds(container)
            drain = _environment(container).get("ARXIO_AUDIT_DRAIN_SECONDS")
            if drain is not None:
                needed += float(drain)
            elif container["name"] == "audit-ingest":
                needed += INGEST_DRAIN_DEFAULT_SECONDS
    if grace < needed + GRACE_MARGIN:
        return [
            f"{_name(item)}: termination grace period {grace} s is not "
            f"longer than preStop and shutdown ({needed:g} s) plus "
            f"{GRACE_MARGIN} s"
        ]

    return []


def _check_model_grace(item: dict) -> list[str]:
    """Check that a shutdown lets a model call in flight finish."""
    found = []
    for container in pod_spec(item).get("containers", []):
        environment = _environment(container)
        if "ARXIO_MODEL_TIMEOUT_SECONDS" not in environment:
            continue
        timeout = float(environment["ARXIO_MODEL_TIMEOUT_SECONDS"])
        grace = float(environment.get("ARXIO_SHUTDOWN_GRACE_SECONDS", 10))
        if grace < timeout + GRACE_MARGIN:
            found.append(
                f"{_name(item)} container {container['name']}: "
                f"ARXIO_SHUTDOWN_GRACE_SECONDS {grace:g} s is shorter than "
                f"ARXIO_MODEL_TIMEOUT_SECONDS {timeout:g} s plus "
                f"{GRACE_MARGIN} s, so a shutdown cuts off model reviews"
            )

    return found


def _selected(item: dict, objects, kind: str) -> list[dict]:
    labels = pod_labels(item)

    return [
        other
        for other in objects
        if other["kind"] == kind
        and _selects(other["spec"].get("selector", {}), labels)
    ]


def _serves_grpc(item: dict) -> bool:
    return any(
        port.get("name") == "grpc"
        for container in pod_spec(item).get("containers", [])
        for port in container.get("ports", [])
    )


def _check_deployment(item: dict, objects) -> list[str]:
    found = []
    name = item["metadata"]["name"]
    app = pod_labels(item).get("app")
    keys = set()
    for constraint in pod_spec(item).get("topologySpreadConstraints", []):
        if _selects(constraint.get("labelSelector", {}), {"app": app}):
            keys.add(constraint["topologyKey"])
    for key in ("topology.kubernetes.io/zone", "kubernetes.io/hostname"):
        if key not in keys:
            found.append(f"{_name(item)}: no topology spread over {key}")
    if not _selected(item, objects, "PodDisruptionBudget"):
        found.append(f"{_name(item)}: no PodDisruptionBudget selects it")
    targets = {
        other["spec"]["scaleTargetRef"]["name"]
        for other in objects
        if other["kind"] == "HorizontalPodAutoscaler"
    }
    if name in AUTOSCALED and name not in targets:
        found.append(f"{_name(item)}: no HorizontalPodAutoscaler")

    return found


def _check_services(objects) -> list[str]:
    found = []
    grpc_apps = set()
    for item in objects:
        if item["kind"] not in WORKLOAD_KINDS:
            continue
        for container in pod_spec(item).get("containers", []):
            if any(
                p.get("name") == "grpc" for p in container.get("ports", [])
            ):
                grpc_apps.add(pod_labels(item).get("app"))
    for item in objects:
        if item["kind"] != "Service":
            continue
        app = item["spec"].get("selector", {}).get("app")
        names = {port.get("name") for port in item["spec"]["ports"]}
        if app in grpc_apps and "grpc" not in names:
            found.append(f"{_name(item)}: its gRPC port is not named grpc")

    return found


def _check_network_policy(item: dict, objects) -> list[str]:
    """Require a policy that names the workload's `app`, not only shared
    ones (deny-all, DNS, database clients)."""
    app = pod_labels(item).get("app")
    for other in objects:
        if other["kind"] != "NetworkPolicy":
            continue
        selector = other["spec"].get("podSelector", {})
        if selector.get("matchLabels", {}).get("app") == app:
            return []

    return [f"{_name(item)}: no NetworkPolicy of its own selects its pods"]


def _check_job(item: dict) -> list[str]:
    spec = item["spec"]
    if item["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    found = []
    for field in ("backoffLimit", "activeDeadlineSeconds"):
        if field not in spec:
            found.append(f"{_name(item)}: no {field}")

    return found


def violations(objects) -> list[str]:
    """Return every breach of the policy among the rendered `objects`."""
    found = _check_services(objects)
    for item in objects:
        if item["kind"] not in WORKLOAD_KINDS:
            continue
        spec = pod_spec(item)
        found += _check_labels(item)
        found += _check_pod(item, objects)
        found += _check_network_policy(item, objects)
        containers = spec.get("containers", [])
        sidecars = [
            c
            for c in spec.get("initContainers", [])
            if c.get("restartPolicy") == "Always"
        ]
        for container in containers + sidecars:
            found += _check_container(item, container)
        if item["kind"] in ("Job", "CronJob"):
            found += _check_job(item)
            continue
        for container in containers:
            found += _check_probes(item, container)
        found += _check_grace(item)
        found += _check_model_grace(item)
        if item["kind"] == "Deployment" or (
            item["kind"] == "StatefulSet" and _serves_grpc(item)
        ):
            found += _check_deployment(item, objects)

    return found
