"""Layering and hygiene rules that keep the codebase in shape, checked on every test run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed next to {sys.executable}; run `make venv`"
    return found


def test_import_layering_contracts_hold() -> None:
    # core imports no kopf/grpc/kubernetes; operator and agent never import each other.
    result = subprocess.run(
        [_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_package_shadows_the_standard_library_operator_module() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
    import operator

    assert operator.__file__ is not None
    assert "site-packages" not in operator.__file__
    assert not operator.__file__.startswith(str(ROOT))


def test_crds_in_the_package_are_the_crds_folder() -> None:
    link = ROOT / "core" / "edgefleet_core" / "crds"
    assert link.is_symlink()
    assert link.resolve() == (ROOT / "crds").resolve()
