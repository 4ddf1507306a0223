"""The container images and the bare-device unit, checked without a docker engine or systemd running.

Dockerfiles are parsed (pinned bases, multi-stage, non-root final stage without build tools, every
COPY source present and inside the build context), ``.dockerignore`` is evaluated the way the docker
CLI does, the pinned requirement lists are checked for completeness, and the systemd unit's
``ExecStart`` is checked against the real ``edgefleet agent run`` options.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import typer
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from edgefleet_agent.cli import app as agent_app
from tests.support.requirements import NOT_INSTALLED_ON_LINUX, pinned

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"operator": ROOT / "operator" / "Dockerfile", "agent": ROOT / "agent" / "Dockerfile"}
REQUIREMENTS = {"operator": ROOT / "operator" / "requirements.txt", "agent": ROOT / "agent" / "requirements.txt"}
UNIT = ROOT / "deploy" / "systemd" / "edgefleet-agent.service"
ENV_TEMPLATE = ROOT / "deploy" / "systemd" / "agent.env"

PINNED_BASE = re.compile(r"^[a-z0-9./-]+:\d+\.\d+\.\d+-[a-z0-9.-]+@sha256:[0-9a-f]{64}$")
"""``name:MAJOR.MINOR.PATCH-variant@sha256:<64 hex>``: a full version tag and a digest."""
BUILD_TOOLS = re.compile(r"\b(pip|pip3|apt-get|apt|apk|gcc|cc|make|build-essential|setuptools|wheel|compileall)\b")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages with their instructions (keyword upper-cased, continuation lines joined, comments dropped)."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        lines.append(pending.strip())
        pending = ""
    assert not pending, f"{path}: a continuation line ends the file"
    stages: list[Stage] = []
    for line in lines:
        keyword, _, arg = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = arg.split()
            named = len(words) == 3 and words[1].upper() == "AS"
            assert len(words) == 1 or named, f"{path}: FROM {arg!r}"
            stages.append(Stage(words[0], words[2] if named else None))
            continue
        assert stages, f"{path}: {keyword} before any FROM"
        stages[-1].instructions.append((keyword, arg.strip()))
    return stages


def copy_sources(arg: str) -> tuple[list[str], list[str]]:
    """(options, sources) of a COPY instruction (the last word is the destination)."""
    words = json_or_words(arg)
    options = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    return options, paths[:-1]


def json_or_words(arg: str) -> list[str]:
    if arg.startswith("["):
        return [w.strip().strip('"') for w in arg.strip("[]").split(",")]
    return shlex.split(arg)


# ------------------------------------------------------------------------------------------------ .dockerignore


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (Go's filepath.Match, plus ``**`` for any number of folders)."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        cleaned = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((include, _pattern(cleaned)))
    return rules


def in_context(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the docker CLI sends ``relative`` to the builder: the last rule matching it or a parent wins."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for include, pattern in rules:
        if any(pattern.match(p) for p in prefixes):
            excluded = not include
    return not excluded


# ------------------------------------------------------------------------------------------------ Dockerfiles


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_every_stage_starts_from_a_base_pinned_by_version_and_digest(image: str) -> None:
    stages = parse_dockerfile(DOCKERFILES[image])
    names = {s.name for s in stages if s.name}
    for stage in stages:
        assert PINNED_BASE.match(stage.base) or stage.base in names, f"{image}: FROM {stage.base} is not pinned"
        assert ":latest" not in stage.base
    text = DOCKERFILES[image].read_text(encoding="utf-8")
    assert "latest" not in re.sub(r"#.*", "", text)
    # One base for every stage: the venv built in the first one runs on the same Python in the last.
    assert len({s.base for s in stages if s.base not in names}) == 1


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_the_final_stage_is_non_root_without_build_tools_and_runs_edgefleet(image: str) -> None:
    stages = parse_dockerfile(DOCKERFILES[image])
    assert len(stages) >= 2, f"{image}: not multi-stage"
    final = stages[-1]
    assert final.name is None or final.name not in {s.name for s in stages[:-1]}
    [user] = final.args("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), f"{image}: USER {user} is not numeric"
    assert int(uid) > 0, f"{image}: USER {user} is root"
    assert not gid or int(gid) > 0, f"{image}: USER {user}"
    for run in final.args("RUN"):
        assert not BUILD_TOOLS.search(run), f"{image}: the final stage runs {run!r}"
    copies_from_builder = [copy_sources(a) for a in final.args("COPY")]
    assert copies_from_builder, f"{image}: the final stage copies nothing"
    for options, sources in copies_from_builder:
        assert any(o.startswith("--from=") for o in options), (
            f"{image}: the final stage copies {sources} from the context"
        )
        assert sources == ["/opt/edgefleet"], f"{image}: the final stage copies {sources}, not only the venv"
    [entrypoint] = final.args("ENTRYPOINT")
    assert json_or_words(entrypoint) == ["edgefleet"]
    env = " ".join(final.args("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "/opt/edgefleet/bin" in env
    assert final.args("HEALTHCHECK"), f"{image}: say whether there is a health check"
    labels = " ".join(final.args("LABEL"))
    for key in ("title", "description", "version", "licenses", "base.name", "base.digest"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert final.base.split("@", 1)[1] in labels


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_the_builder_installs_only_pinned_binary_wheels_without_cache(image: str) -> None:
    stages = parse_dockerfile(DOCKERFILES[image])
    runs = " ".join(run for stage in stages[:-1] for run in stage.args("RUN"))
    env = " ".join(e for stage in stages[:-1] for e in stage.args("ENV"))
    assert "PIP_NO_CACHE_DIR=1" in env
    requirements = REQUIREMENTS[image].relative_to(ROOT).as_posix()
    assert f"--no-deps --no-compile --only-binary=:all: -r {requirements}" in " ".join(runs.split())
    assert "check" in runs  # pip check: the pinned list is a consistent closure
    assert re.search(r"install --no-deps --no-compile /dist/edgefleet-\*\.whl", runs)
    for tool in re.findall(r"(\w[\w-]*)==", runs):
        assert tool in {"pip", "setuptools", "wheel"}, tool
    assert not re.search(r"pip(?:3)? install(?![^&]*==)(?![^&]*-r )(?![^&]*\.whl)", runs), "an unpinned pip install"
    assert "apt-get" not in runs  # binary wheels only: no compiler in any stage


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_every_copied_path_exists_and_is_in_the_build_context(image: str) -> None:
    rules = dockerignore_rules()
    for stage in parse_dockerfile(DOCKERFILES[image]):
        for options, sources in (copy_sources(a) for a in stage.args("COPY")):
            if any(o.startswith("--from=") for o in options):
                continue
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"{image}: COPY {source}: no such path in the repository"
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() or p.is_symlink()]
                sent = [f for f in files if in_context(f.relative_to(ROOT).as_posix(), rules)]
                assert sent, f"{image}: COPY {source}: .dockerignore leaves nothing of it in the context"
    # core/edgefleet_core/crds links to ../../crds: the link's target must travel too.
    assert (ROOT / "core" / "edgefleet_core" / "crds").is_symlink()
    assert in_context("crds/edgemodels.edgefleet.io.yaml", rules)


def test_dockerignore_keeps_environments_caches_tests_and_secrets_out() -> None:
    rules = dockerignore_rules()
    for kept_out in (
        ".venv/bin/python",
        ".venv-other/lib/x.py",
        ".git/HEAD",
        "build/lib/edgefleet_core/__init__.py",
        "dist/edgefleet-0.1.0.whl",
        "edgefleet.egg-info/PKG-INFO",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/x",
        ".pytest_cache/v",
        ".hypothesis/examples/x",
        "core/edgefleet_core/__pycache__/atomic.cpython-311.pyc",
        "operator/edgefleet_operator/__pycache__/cli.cpython-311.pyc",
        "tests/unit/test_cli.py",
        "core/edgefleet_core/tests/x.py",
        "helm/edgefleet/values.yaml",
        "docs/install-device.md",
        "examples/models/digits.onnx",
        "keys/root-key.json",
        ".edgefleet/cache/x",
        "reports/run.json",
    ):
        assert not in_context(kept_out, rules), kept_out
    for sent in (
        "pyproject.toml",
        "README.md",
        "core/edgefleet_core/cli/main.py",
        "agent/edgefleet_agent/daemon.py",
        "operator/edgefleet_operator/cli.py",
        "proto/edgefleet_proto/v1/fleet_pb2.py",
        "agent/requirements.txt",
        "operator/requirements.txt",
    ):
        assert in_context(sent, rules), sent


def test_dockerignore_matching_follows_docker_semantics() -> None:
    rules = [(False, _pattern("*")), (True, _pattern("src")), (False, _pattern("**/__pycache__"))]
    assert in_context("src/a.py", rules)
    assert not in_context("src/__pycache__/a.pyc", rules)
    assert not in_context("other/a.py", rules)
    assert not in_context("src2/a.py", rules)


# ------------------------------------------------------------------------------------------------ requirements


@pytest.mark.parametrize("image", sorted(REQUIREMENTS))
def test_the_pinned_lists_are_complete_closures(image: str) -> None:
    listed = pinned(REQUIREMENTS[image])
    assert "edgefleet" not in listed
    missing: list[str] = []
    for name in listed:
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            pytest.fail(f"{image}: {name} is pinned but not installed here, so untested")
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            if canonicalize_name(requirement.name) not in listed | dict.fromkeys(NOT_INSTALLED_ON_LINUX):
                missing.append(f"{name} needs {requirement}")
    assert not missing, f"{REQUIREMENTS[image].name} lacks dependencies: {missing}"


def closure(roots: set[str]) -> set[str]:
    """Every distribution a plain (no extras) install of ``roots`` pulls on this platform."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_INSTALLED_ON_LINUX:
            continue
        seen.add(name)
        for text in distribution(name).requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


def test_the_operator_image_holds_exactly_edgefleets_runtime_closure_and_no_extra() -> None:
    listed = pinned(REQUIREMENTS["operator"])
    runtime = closure({"edgefleet"}) - {"edgefleet"}
    # Neither the `train` extra (torch) nor the dev tools, and nothing edgefleet does not need.
    assert set(listed) == runtime, {"missing": runtime - set(listed), "not needed": set(listed) - runtime}
    assert "torch" not in listed
    agent = pinned(REQUIREMENTS["agent"])
    assert set(agent) < set(listed)
    # One set of versions: the agent runs what the operator's build Jobs produced bundles with.
    assert {n: agent[n] for n in agent} == {n: listed[n] for n in agent}


# ------------------------------------------------------------------------------------------------ systemd unit


def read_unit() -> configparser.RawConfigParser:
    unit = configparser.RawConfigParser(
        strict=False, interpolation=None, delimiters=("=",), empty_lines_in_values=False
    )
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string(UNIT.read_text(encoding="utf-8").replace("\\\n", " "))
    return unit


def agent_run_options() -> set[str]:
    command = typer.main.get_command(agent_app)
    assert isinstance(command, typer.core.TyperGroup)
    return {opt for param in command.commands["run"].params for opt in param.opts}


def env_template() -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in ENV_TEMPLATE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, raw
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), raw
            values[key] = value
    return values


def test_the_unit_runs_the_agent_with_flags_that_exist_and_settings_the_template_defines() -> None:
    unit = read_unit()
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[:3] == ["/opt/edgefleet/current/bin/edgefleet", "agent", "run"]
    flags = [a for a in argv if a.startswith("--")]
    options = agent_run_options()
    assert set(flags) <= options, set(flags) - options
    assert {"--state", "--name", "--gateway", "--enroll-gateway", "--gateway-ca", "--tuf-root"} <= set(flags)
    assert "--token" not in flags  # a token on the command line is visible to every user
    template = env_template()
    for variable in re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", service["ExecStart"]):
        assert variable == "STATE_DIRECTORY" or variable in template, f"ExecStart uses ${variable}, not in agent.env"
    # The optional flags in the template are real ones too.
    extra = [w for w in template["EDGEFLEET_AGENT_ARGS"].split() if w.startswith("--")]
    assert set(extra) <= options
    for line in ENV_TEMPLATE.read_text(encoding="utf-8").splitlines():
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]+", line):
            assert flag in options, f"agent.env mentions {flag}, which `edgefleet agent run` does not have"


def test_the_unit_is_hardened_and_restarts_with_backoff() -> None:
    unit = read_unit()
    service = unit["Service"]
    expected = {
        "DynamicUser": "yes",
        "StateDirectory": "edgefleet-agent",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "Restart": "on-failure",
        "EnvironmentFile": "-/etc/edgefleet/agent-token.env",  # configparser keeps the last of repeated keys
    }
    for key, value in expected.items():
        assert service.get(key) == value, f"{key}={service.get(key)!r}"
    assert service["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"]
    assert "@system-service" in UNIT.read_text(encoding="utf-8")
    assert "EnvironmentFile=/etc/edgefleet/agent.env" in UNIT.read_text(encoding="utf-8")
    assert service["RestartSec"] == "5s"
    assert service["RestartMaxDelaySec"] == "10min"
    assert service["RestartPreventExitStatus"] == "2"
    assert unit["Unit"]["StartLimitIntervalSec"] == "0"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def systemd_version(analyze: str) -> int:
    out = subprocess.run([analyze, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"systemd (\d+)", out)
    return int(match[1]) if match else 0


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None)
    if analyze is None or units is None:
        pytest.skip("systemd-analyze or the system's unit folder is not on this machine")
    # A scratch root: the system's units (for the targets named in [Unit]), a stand-in for the venv's
    # edgefleet script (verify checks that ExecStart is executable), and the unit under test.
    shutil.copytree(units, tmp_path / "usr/lib/systemd/system", symlinks=True)
    script = tmp_path / "opt/edgefleet/current/bin/edgefleet"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, tmp_path / "etc/systemd/system" / UNIT.name)
    done = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={tmp_path}", f"/etc/systemd/system/{UNIT.name}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if systemd_version(analyze) < 254:  # the backoff keys are newer than this systemd
        problems = [p for p in problems if not re.search(r"Unknown key '(RestartSteps|RestartMaxDelaySec)'", p)]
    assert not problems, problems
    assert done.returncode == 0, done.stderr
