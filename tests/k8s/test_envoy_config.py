"""Envoy's cluster config comes from the template that `make run` uses."""

import dataclasses
import subprocess
import sys
from pathlib import Path

from services.common.certs import ensure_certificates
from services.launcher import envoy_config, k8s_render
from services.launcher.envoy_config import UPSTREAMS, EdgeSettings, Upstream
from services.launcher.stack import DESCRIPTOR
from tests.k8s.manifests import find, find_workload, pod_spec, rendered

ENVOY = Path(sys.executable).with_name("envoy")


def local_settings(certs: Path) -> EdgeSettings:
    """Return settings shaped like the ones `make run` passes."""
    return EdgeSettings(
        edge_port=8443,
        admin_port=19901,
        certs_dir=certs,
        descriptor=DESCRIPTOR,
        upstreams={
            name: (Upstream("127.0.0.1", 50051 + index),)
            for index, name in enumerate(UPSTREAMS)
        },
        access_log_path=certs.parent / "access.log",
    )


def edge_manager(config: dict) -> dict:
    listener = config["static_resources"]["listeners"][0]

    return listener["filter_chains"][0]["filters"][0]["typed_config"]


class TestClusterConfig:
    def test_committed_file_current(self):
        """k8s/base/config/envoy.yaml equals a fresh render."""
        assert 0 == k8s_render.main(["--check"])

    def test_launcher_render_plus_probes(self):
        """The cluster config is envoy_config.render plus one listener."""
        cluster = k8s_render.render_cluster()
        listeners = cluster["static_resources"]["listeners"]

        assert ["edge", "metrics", "probes"] == [
            item["name"] for item in listeners
        ]
        listeners.pop()
        assert envoy_config.render(k8s_render.cluster_settings()) == cluster

    def test_filters_and_routes_match_local(self, tmp_path):
        """The edge's filters and routes are the same as `make run`'s."""
        # The descriptor's path is a setting: the image keeps it elsewhere.
        settings = dataclasses.replace(
            local_settings(tmp_path), descriptor=k8s_render.DESCRIPTOR
        )
        local = edge_manager(envoy_config.render(settings))
        cluster = edge_manager(k8s_render.render_cluster())

        assert local["http_filters"] == cluster["http_filters"]
        assert local["route_config"] == cluster["route_config"]
        assert local["local_reply_config"] == cluster["local_reply_config"]

    def test_template_change_reaches_both(self, tmp_path, monkeypatch):
        """An edit to the template shows in the local and cluster configs."""
        template = tmp_path / "envoy.yaml.tmpl"
        text = envoy_config.TEMPLATE.read_text()
        assert "request_headers_timeout: 10s" in text
        template.write_text(
            text.replace(
                "request_headers_timeout: 10s", "request_headers_timeout: 7s"
            )
        )
        monkeypatch.setattr(envoy_config, "TEMPLATE", template)

        local = edge_manager(envoy_config.render(local_settings(tmp_path)))
        cluster = edge_manager(k8s_render.render_cluster())

        assert "7s" == local["request_headers_timeout"]
        assert "7s" == cluster["request_headers_timeout"]

    def test_upstreams_are_service_names(self):
        """Each cluster resolves its Service by DNS and checks its name."""
        config = k8s_render.render_cluster()
        for cluster in config["static_resources"]["clusters"]:
            name = cluster["name"]
            if name == envoy_config.METRICS_ADMIN_CLUSTER:
                # Envoy's own admin interface on loopback, for /metrics.
                continue
            endpoint = cluster["load_assignment"]["endpoints"][0]
            address = endpoint["lb_endpoints"][0]["endpoint"]["address"]
            tls = cluster["transport_socket"]["typed_config"]
            matcher = tls["common_tls_context"]["validation_context"][
                "match_typed_subject_alt_names"
            ][0]["matcher"]

            assert "STRICT_DNS" == cluster["type"]
            assert name == address["socket_address"]["address"]
            assert (
                k8s_render.SERVICE_PORTS[name]
                == address["socket_address"]["port_value"]
            )
            assert {"exact": name} == matcher

    def test_envoy_validates_cluster_config(self, tmp_path):
        """`envoy --mode validate` accepts the cluster config."""
        certs = ensure_certificates(tmp_path / "certs")
        settings = dataclasses.replace(
            k8s_render.cluster_settings(),
            certs_dir=certs,
            descriptor=DESCRIPTOR,
            access_log_path=tmp_path / "access.log",
        )
        path = tmp_path / "envoy.yaml"
        path.write_text(k8s_render.render_cluster_text(settings))

        completed = subprocess.run(
            [str(ENVOY), "--mode", "validate", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

        assert 0 == completed.returncode, completed.stderr[-2000:]


class TestManifestsMatchConfig:
    def test_envoy_ports_and_paths(self):
        """Envoy's pod serves the ports and mounts the paths of its config."""
        envoy = pod_spec(find(rendered("prod"), "Deployment", "envoy"))
        container = envoy["containers"][0]
        ports = {
            port["name"]: port["containerPort"] for port in container["ports"]
        }
        mounts = {
            mount["name"]: mount["mountPath"]
            for mount in container["volumeMounts"]
        }

        assert k8s_render.EDGE_PORT == ports["https"]
        assert k8s_render.PROBE_PORT == ports["probes"]
        assert k8s_render.METRICS_PORT == ports["metrics"]
        assert str(k8s_render.CERTS_DIR) == mounts["tls"]
        assert str(k8s_render.ACCESS_LOG.parent) == mounts["access-log"]
        assert "/etc/arxio/envoy/envoy.yaml" in container["command"]

    def test_service_ports(self):
        """Each service listens on the port that Envoy's cluster names."""
        objects = rendered("prod")
        for name, port in k8s_render.SERVICE_PORTS.items():
            container = pod_spec(find_workload(objects, name))["containers"][0]
            environment = {
                entry["name"]: entry.get("value") for entry in container["env"]
            }

            assert str(port) == environment["ARXIO_PORT"], name
            assert (
                port
                == find(objects, "Service", name)["spec"]["ports"][0]["port"]
            )

    def test_ingester_reads_access_log(self):
        """The audit ingester beside Envoy tails the file Envoy writes."""
        envoy = pod_spec(find(rendered("prod"), "Deployment", "envoy"))
        ingest = envoy["initContainers"][0]
        environment = {
            entry["name"]: entry.get("value") for entry in ingest["env"]
        }

        assert "Always" == ingest["restartPolicy"]
        assert (
            str(k8s_render.ACCESS_LOG) == environment["ARXIO_AUDIT_LOG_FILE"]
        )

    def test_heap_limit_below_memory_limit(self):
        """The overload manager acts before the kubelet's OOM kill."""
        envoy = pod_spec(find(rendered("prod"), "Deployment", "envoy"))
        limit = envoy["containers"][0]["resources"]["limits"]["memory"]

        assert "1Gi" == limit
        assert k8s_render.MAX_HEAP_BYTES < 1024**3
