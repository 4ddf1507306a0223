"""The ``edgefleet`` command line, driven in-process through typer's runner."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from edgefleet_core import __version__
from edgefleet_core.cli import plugins
from edgefleet_core.cli.main import build_app
from edgefleet_core.resources.crds import CRD_FILES

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
runner = CliRunner()

SAMPLE_GROUP = typer.Typer()
"""A command group that a fake entry point below points at."""


@SAMPLE_GROUP.command()
def hello() -> None:
    typer.echo("hello from a plugin")


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(build_app(), list(args))
    return result.exit_code, result.stdout, result.stderr


def test_help_lists_the_command_groups() -> None:
    code, out, _ = invoke("--help")
    assert code == 0
    assert "resources" in out
    assert "version" in out


def test_no_arguments_shows_help_and_fails() -> None:
    code, out, _ = invoke()
    assert code == 2
    assert "Usage" in out


def test_version() -> None:
    code, out, _ = invoke("version")
    assert code == 0
    assert out.strip() == __version__


def test_validate_accepts_the_valid_examples() -> None:
    code, out, _ = invoke("resources", "validate", str(EXAMPLES / "valid"))
    assert code == 0, out
    assert out.strip().splitlines()[-1] == f"{len(list((EXAMPLES / 'valid').glob('*.yaml')))} valid, 0 invalid"


def test_validate_names_the_field_and_fails() -> None:
    code, out, _ = invoke("resources", "validate", str(EXAMPLES / "invalid" / "edgemodel-wave-over-100.yaml"))
    assert code == 1
    assert "spec.rollout.waves[1].percent" in out


def test_validate_json_output() -> None:
    path = EXAMPLES / "invalid" / "deviceclass-missing-selector.yaml"
    code, out, _ = invoke("resources", "validate", "-o", "json", str(EXAMPLES / "valid"), str(path))
    assert code == 1
    results = json.loads(out)
    bad = [r for r in results if not r["valid"]]
    assert [p["field"] for p in bad[0]["problems"]] == ["spec.selector"]
    assert all(r["valid"] for r in results if r["source"] != str(path))


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("a: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n", "apiVersion"),
    ],
)
def test_validate_reports_malformed_files(tmp_path: Path, content: str, fragment: str) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text(content, encoding="utf-8")
    code, out, _ = invoke("resources", "validate", str(file))
    assert code == 1
    assert fragment in out


def test_validate_missing_path_and_empty_folder(tmp_path: Path) -> None:
    code, out, _ = invoke("resources", "validate", str(tmp_path / "nope.yaml"))
    assert code == 1
    assert "No such file" in out
    code, _, err = invoke("resources", "validate", str(tmp_path))
    assert code == 1
    assert "no resources found" in err


def test_validate_refuses_oversized_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("edgefleet_core.resources.loading.MAX_DOCUMENT_BYTES", 64)
    file = tmp_path / "big.yaml"
    file.write_text("# " + "x" * 100 + "\n", encoding="utf-8")
    code, out, _ = invoke("resources", "validate", str(file))
    assert code == 1
    assert "over 64" in out


def test_defaults_prints_what_the_api_server_would_store() -> None:
    code, out, _ = invoke("resources", "defaults", str(EXAMPLES / "valid" / "edgemodel-minimal.yaml"))
    assert code == 0
    stored = yaml.safe_load(out)
    # Optional objects without a CRD default stay absent, as on the API server.
    assert "partition" not in stored["spec"]
    assert stored["spec"]["paused"] is False
    assert stored["spec"]["artifactPolicy"] == "Retain"
    assert stored["spec"]["source"]["format"] == "onnx"


def test_defaults_refuses_invalid_input() -> None:
    code, _, err = invoke("resources", "defaults", str(EXAMPLES / "invalid" / "edgemodel-bad-sha256.yaml"))
    assert code == 1
    assert "spec.source.sha256" in err


def test_crds_prints_every_crd() -> None:
    code, out, _ = invoke("resources", "crds")
    assert code == 0
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [d["metadata"]["name"] for d in docs] == [f.removesuffix(".yaml") for f in CRD_FILES]


def test_explain_walks_into_arrays_and_names_unknown_fields() -> None:
    code, out, _ = invoke("resources", "explain", "edgemodel.spec.rollout.waves.pause")
    assert code == 0
    assert "FIELD: EdgeModel.spec.rollout.waves.pause <string>" in out
    assert "DEFAULT: 0s" in out
    code, _, err = invoke("resources", "explain", "EdgeModel.spec.rollout.surge")
    assert code == 1
    assert "has no field 'surge'" in err
    code, _, err = invoke("resources", "explain", "Router")
    assert code == 1
    assert "unknown kind" in err


def _entry_point(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=plugins.ENTRY_POINT_GROUP)


def test_plugin_groups_are_discovered_and_broken_ones_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    points = [
        _entry_point("sample", "tests.unit.test_cli:SAMPLE_GROUP"),
        _entry_point("missing", "edgefleet_no_such_package.cli:app"),
        _entry_point("notatyper", "edgefleet_core:__version__"),
    ]
    monkeypatch.setattr(plugins, "entry_points", lambda group: points if group == plugins.ENTRY_POINT_GROUP else [])
    groups = {g.name: g for g in plugins.discover()}
    assert groups["sample"].app is SAMPLE_GROUP
    assert groups["missing"].app is None
    assert "cannot import" in (groups["missing"].problem or "")
    assert "not a typer.Typer" in (groups["notatyper"].problem or "")

    code, out, _ = invoke("sample", "hello")
    assert code == 0
    assert "hello from a plugin" in out
    code, _, err = invoke("missing")
    assert code == 3
    assert "edgefleet missing is unavailable" in err


def _command_paths() -> list[tuple[str, ...]]:
    root = typer.main.get_command(build_app())
    paths: list[tuple[str, ...]] = []

    def walk(command: object, path: tuple[str, ...]) -> None:
        paths.append(path)
        # typer vendors its own click: a group is whatever has sub-commands.
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(root, ())
    return paths


@pytest.mark.parametrize("path", _command_paths(), ids=lambda p: " ".join(p) or "edgefleet")
def test_every_command_prints_its_help(path: tuple[str, ...]) -> None:
    # Help text is rendered as rich markup: a stray "[...]" in an option's help crashes --help.
    code, out, err = invoke(*path, "--help")
    assert code == 0, err
    assert "Usage" in out


def test_bench_commands_from_entry_points_join_the_bench_group() -> None:
    def fake() -> None:
        """A benchmark from another package."""
        typer.echo("fake bench ran")

    found = plugins.discover_bench([])
    assert found == []
    missing = plugins.BenchCommand("ghost", None, "cannot import ghost")
    stand_in = plugins.unavailable_bench(missing)
    from edgefleet_core.cli import bench_cmd

    app = typer.Typer()
    app.add_typer(bench_cmd.build_app([("fake", fake), ("ghost", stand_in)]), name="bench")
    result = runner.invoke(app, ["bench", "fake"])
    assert result.exit_code == 0
    assert "fake bench ran" in result.stdout
    result = runner.invoke(app, ["bench", "ghost"])
    assert result.exit_code == 3
    assert "cannot import ghost" in result.stderr
