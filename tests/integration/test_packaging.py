"""The wheel holds what an installed EdgeFleet needs, and its ``edgefleet`` command runs from it."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from edgefleet_core.resources.crds import CRD_FILES

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        timeout=300,
        cwd=out,
    )
    (built,) = out.glob("edgefleet-*.whl")
    return built


def test_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        tops = {n.split("/", 1)[0] for n in names if not n.startswith("edgefleet-")}
        # Four import packages and nothing else; never a top-level `operator` package.
        assert tops == {"edgefleet_core", "edgefleet_operator", "edgefleet_agent", "edgefleet_proto"}
        for crd in CRD_FILES:
            # The link in edgefleet_core/crds is packed as real files with the crds/ content.
            assert zf.read(f"edgefleet_core/crds/{crd}") == (ROOT / "crds" / crd).read_bytes()
        for package in tops:
            assert f"{package}/py.typed" in names
        for stub in (
            "fleet_pb2.py",
            "fleet_pb2.pyi",
            "fleet_pb2_grpc.py",
            "inference_pb2.py",
            "inference_pb2_grpc.pyi",
        ):
            assert f"edgefleet_proto/v1/{stub}" in names
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    assert "edgefleet = edgefleet_core.cli.main:run" in entry_points
    assert "Requires-Python: >=3.11" in metadata
    assert "Provides-Extra: train" in metadata
    assert "Provides-Extra: dev" in metadata


def test_edgefleet_runs_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    # A fresh venv gets only the wheel; third-party packages come from this interpreter's
    # site-packages on PYTHONPATH (.pth files there, such as the editable install's, are not read),
    # so every edgefleet module is imported from the wheel and nothing is downloaded.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    where = subprocess.run(
        [str(python), "-c", "import edgefleet_core, edgefleet_proto; print(edgefleet_core.__file__)"],
        check=True, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert where.stdout.startswith(str(env_dir))
    helped = subprocess.run(
        [str(env_dir / "bin" / "edgefleet"), "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert helped.returncode == 0, helped.stderr
    assert "resources" in helped.stdout
    checked = subprocess.run(
        [str(env_dir / "bin" / "edgefleet"), "resources", "validate", str(ROOT / "examples" / "valid")],
        capture_output=True, text=True, check=False, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.slow
def test_pip_install_into_an_empty_venv_resolves_dependencies(wheel: Path, tmp_path: Path) -> None:
    # The real thing a user does: `pip install` with dependencies from the package index.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], check=True, timeout=600)
    helped = subprocess.run(
        [str(env_dir / "bin" / "edgefleet"), "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=tmp_path,
    )
    assert helped.returncode == 0, helped.stderr
    assert "resources" in helped.stdout
