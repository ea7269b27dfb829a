"""Fixtures shared by the screening-engine tests."""

import shutil
from pathlib import Path

import pytest

from services.cds.knowledge_base import (
    KNOWLEDGE_DIR,
    KnowledgeBase,
    load_knowledge_base,
)


@pytest.fixture(scope="session")
def kb() -> KnowledgeBase:
    """Load the knowledge base shipped with the service."""
    return load_knowledge_base()


@pytest.fixture
def knowledge_copy(tmp_path: Path) -> Path:
    """Copy the shipped knowledge files to a folder a test may edit."""
    directory = tmp_path / "knowledge"
    shutil.copytree(KNOWLEDGE_DIR, directory)

    return directory
