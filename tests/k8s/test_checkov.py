"""checkov, offline, passes every rendered overlay and fails a bad one."""

import copy
import json
import os
import subprocess

from tests.k8s.manifests import (
    K8S,
    OVERLAYS,
    REPO_ROOT,
    find,
    pod_spec,
    rendered,
    require_tool,
    to_yaml,
)

# checkov lives in its own venv (see the Makefile's k8s-tools target).
CHECKOV = REPO_ROOT / ".venv-checkov" / "bin" / "checkov"


def run_checkov(directory) -> dict:
    """Scan every file in `directory`; return checkov's JSON report."""
    environment = os.environ | {
        # No version check against PyPI and no Prisma Cloud mapping.
        "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true",
        "BC_SKIP_MAPPING": "TRUE",
    }
    completed = subprocess.run(
        [
            str(require_tool(CHECKOV)),
            "--config-file",
            str(K8S / "checkov.yaml"),
            "--directory",
            str(directory),
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=environment,
    )
    if completed.returncode not in (0, 1):
        raise RuntimeError(f"checkov failed to run: {completed.stderr}")

    return json.loads(completed.stdout)


def failed_checks(report: dict) -> list[str]:
    """Return "FILE CHECK RESOURCE" for each failed check."""
    return [
        f"{check['file_path'].lstrip('/')} {check['check_id']} "
        f"{check['resource']}"
        for check in report["results"]["failed_checks"]
    ]


def privileged_auth() -> list[dict]:
    """Return prod with auth's container privileged and run as root."""
    objects = copy.deepcopy(list(rendered("prod")))
    spec = pod_spec(find(objects, "Deployment", "auth"))
    del spec["securityContext"]["runAsNonRoot"]
    security = spec["containers"][0]["securityContext"]
    security["privileged"] = True
    security["allowPrivilegeEscalation"] = True

    return objects


def test_overlays_pass_and_break_fails(tmp_path):
    """checkov passes every overlay and fails a privileged container.

    One run scans both, since each run takes seconds to start.
    """
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(to_yaml(rendered(overlay)))
    (tmp_path / "broken.yaml").write_text(to_yaml(privileged_auth()))

    report = run_checkov(tmp_path)
    failed = failed_checks(report)

    assert report["summary"]["passed"] > 0
    assert [] == [line for line in failed if not line.startswith("broken")]
    assert "broken.yaml CKV_K8S_16 Deployment.arxio.auth" in failed
    assert "broken.yaml CKV_K8S_20 Deployment.arxio.auth" in failed
