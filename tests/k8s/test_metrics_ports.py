"""Every metrics endpoint is a declared container port that Prometheus
finds and may reach."""

import pytest

from services.launcher import k8s_render
from tests.k8s.manifests import (
    OVERLAYS,
    find_workload,
    pod_spec,
    rendered,
)

MONITORING_NAMESPACE = "monitoring"
SERVICES = ("auth", "cds", "audit", "billing")
# The workloads that run servers (the audit service is a StatefulSet).
SERVED_KINDS = ("Deployment", "StatefulSet")


def environment(container: dict) -> dict[str, str | None]:
    return {
        entry["name"]: entry.get("value") for entry in container.get("env", [])
    }


def metrics_ports(workload: dict) -> list[tuple[str, int]]:
    """Return (container, port) for each metrics endpoint of a pod."""
    spec = pod_spec(workload)
    found = []
    for container in spec["containers"] + spec.get("initContainers", []):
        port = environment(container).get("ARXIO_METRICS_PORT")
        if port is not None:
            found.append((container["name"], int(port)))
        if (
            # Ollama's image runs its own entrypoint, with no command.
            container.get("command", [""])[0] == "envoy"
            and workload["metadata"]["name"] == "envoy"
        ):
            found.append((container["name"], k8s_render.METRICS_PORT))

    return found


def declared_ports(workload: dict, container_name: str) -> set[int]:
    spec = pod_spec(workload)
    for container in spec["containers"] + spec.get("initContainers", []):
        if container["name"] == container_name:
            return {port["containerPort"] for port in container["ports"]}
    raise KeyError(container_name)


def scrape_port(annotations: dict) -> int | None:
    """Return the port that prometheus.io annotations name for scraping."""
    if annotations.get("prometheus.io/scrape") != "true":
        return None
    if annotations.get("prometheus.io/path", "/metrics") != "/metrics":
        return None
    port = annotations.get("prometheus.io/port")

    return None if port is None else int(port)


def container_port(workload: dict, target: int | str) -> int | None:
    """Resolve a Service's targetPort, a number or a port name, in a pod."""
    if isinstance(target, int):
        return target
    spec = pod_spec(workload)
    # The audit ingester is a native sidecar, among the init containers.
    for container in spec["containers"] + spec.get("initContainers", []):
        for port in container.get("ports", []):
            if port.get("name") == target:
                return port["containerPort"]

    return None


def annotated_ports(objects, workload: dict) -> set[int]:
    """Return the pod's ports that annotation-based discovery scrapes.

    Discovery of pods reads the pod's annotations. Discovery of Service
    endpoints reads the annotations of each Service that selects the pod,
    and scrapes the annotated port if the Service forwards to it.
    """
    template = workload["spec"]["template"]["metadata"]
    found = {scrape_port(template.get("annotations", {}))}
    labels = template["labels"]
    for item in objects:
        if item["kind"] != "Service":
            continue
        selector = item["spec"].get("selector", {})
        if not selector or any(
            labels.get(key) != value for key, value in selector.items()
        ):
            continue
        port = scrape_port(item["metadata"].get("annotations", {}))
        targets = {
            container_port(workload, entry.get("targetPort", entry["port"]))
            for entry in item["spec"]["ports"]
        }
        if port in targets:
            found.add(port)

    return found - {None}


def admits_scraping(policy: dict, labels: dict, port: int) -> bool:
    """Return whether `policy` admits the monitoring namespace to `port`
    of a pod with `labels`."""
    selector = policy["spec"]["podSelector"]
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    if not selector:
        return False
    for rule in policy["spec"].get("ingress", []):
        ports = {entry.get("port") for entry in rule.get("ports", [])}
        if port not in ports:
            continue
        for peer in rule.get("from", []):
            names = peer.get("namespaceSelector", {}).get("matchLabels", {})
            if (
                names.get("kubernetes.io/metadata.name")
                == MONITORING_NAMESPACE
                and "podSelector" not in peer
            ):
                return True

    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
class TestMetricsPorts:
    def test_every_service_serves_metrics(self, overlay):
        """Each service and Envoy has a metrics endpoint."""
        objects = rendered(overlay)
        for name in (*SERVICES, "envoy"):
            workload = find_workload(objects, name)

            assert [] != metrics_ports(workload), name

    def test_metrics_ports_declared(self, overlay):
        """Each metrics endpoint is a container port of its container."""
        for item in rendered(overlay):
            if item["kind"] not in SERVED_KINDS:
                continue
            for container, port in metrics_ports(item):
                assert port in declared_ports(item, container), (
                    f"{item['metadata']['name']}/{container}"
                )

    def test_metrics_listen_beyond_loopback(self, overlay):
        """The services bind their metrics server on every interface."""
        for name in SERVICES:
            workload = find_workload(rendered(overlay), name)
            container = pod_spec(workload)["containers"][0]

            assert "0.0.0.0" == environment(container).get(
                "ARXIO_METRICS_HOST"
            ), name

    def test_scrape_annotations(self, overlay):
        """Each pod is annotated with a declared metrics port and path."""
        for name in (*SERVICES, "envoy"):
            workload = find_workload(rendered(overlay), name)
            annotations = workload["spec"]["template"]["metadata"][
                "annotations"
            ]
            ports = {port for _, port in metrics_ports(workload)}

            assert "true" == annotations["prometheus.io/scrape"], name
            assert "/metrics" == annotations["prometheus.io/path"], name
            assert int(annotations["prometheus.io/port"]) in ports, name

    def test_every_metrics_port_scraped(self, overlay):
        """Annotations of the pod or of a Service name each metrics port."""
        objects = rendered(overlay)
        for item in objects:
            if item["kind"] not in SERVED_KINDS:
                continue
            for container, port in metrics_ports(item):
                assert port in annotated_ports(objects, item), (
                    f"{item['metadata']['name']}/{container} port {port}"
                )

    def test_network_policies_admit_scraping(self, overlay):
        """The monitoring namespace may reach every metrics port."""
        objects = rendered(overlay)
        policies = [
            item for item in objects if item["kind"] == "NetworkPolicy"
        ]
        for item in objects:
            if item["kind"] not in SERVED_KINDS:
                continue
            labels = item["spec"]["template"]["metadata"]["labels"]
            for container, port in metrics_ports(item):
                assert any(
                    admits_scraping(policy, labels, port)
                    for policy in policies
                ), f"{item['metadata']['name']}/{container} port {port}"


def test_envoy_stats_listener_rendered():
    """Envoy's config serves /metrics on its declared metrics port."""
    config = k8s_render.render_cluster()
    listener = next(
        item
        for item in config["static_resources"]["listeners"]
        if item["name"] == "metrics"
    )
    address = listener["address"]["socket_address"]

    assert k8s_render.METRICS_PORT == address["port_value"]
    assert "0.0.0.0" == address["address"]
