"""Shared by the GitOps tests: the EdgeModels the real reconciler leaves at each phase, produced once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.unit.gitops.samples import produce

REPO_ROOT = Path(__file__).resolve().parents[3]
DOCS = REPO_ROOT / "docs" / "gitops"
EXAMPLES = REPO_ROOT / "examples" / "gitops"


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Sample name (as in docs/gitops/testdata) → the object with the status the reconciler wrote."""
    return produce(tmp_path_factory.mktemp("gitops-samples"))
