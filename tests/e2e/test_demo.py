"""``edgefleet demo`` end to end, shortened (one agent per class, few inferences), through the real CLI.

Each run is a real process tree: the demo with its embedded control plane, a gateway and two
agent processes. The tests check what a person running it would: the exit code, the summary, the
report on disk, the verdict of each fault, and that Ctrl-C leaves no process and no torn state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from edgefleet_core.store.url import ACCESS_KEY_VARIABLES, ENDPOINT_VARIABLES, SECRET_KEY_VARIABLES
from edgefleet_operator.local.api import LocalApi
from tests.support.s3_server import S3Server, s3_server

__all__ = ["s3_server"]  # the session fixture, used by name below
pytestmark = pytest.mark.e2e
DEMO = [sys.executable, "-m", "edgefleet_core.cli", "demo", "--agents", "2", "--inferences", "40"]
CLASSES = ("edge-cpu", "edge-npu")


def _environment(s3: S3Server | None = None) -> dict[str, str]:
    """This environment without S3 settings (they would send the demo to S3), or with ``s3``'s."""
    s3_variables = {*ENDPOINT_VARIABLES, *ACCESS_KEY_VARIABLES, *SECRET_KEY_VARIABLES}
    env = {k: v for k, v in os.environ.items() if k not in s3_variables}
    if s3 is not None:
        env |= {"AWS_ENDPOINT_URL": s3.url, "AWS_ACCESS_KEY_ID": s3.access_key,
                "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_REGION": s3.region}  # fmt: skip
    return env


def _run(
    state: Path, *extra: str, s3: S3Server | None = None, timeout: float = 110
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DEMO, "--state", str(state), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_environment(s3),
        check=False,
    )


def _survivors(state: Path) -> list[str]:
    """Processes whose command line names the run's folder (its gateway and agents)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(state) in cmdline and process.info["pid"] != os.getpid():
            found.append(f"{process.info['pid']}: {cmdline[:200]}")
    return found


def _no_torn_files(state: Path) -> list[Path]:
    """Temporary files of interrupted atomic writes (there must be none after a clean stop)."""
    return [p for p in state.rglob("*.tmp") if p.is_file()]


def test_a_shortened_demo_serves_both_classes_and_writes_the_report(tmp_path: Path) -> None:
    state = tmp_path / "run"
    result = _run(state, "--out", str(tmp_path / "report"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "PASS version 1 rolled out to every device" in output
    summary = output[output.index("Summary per device class") :]
    rows = {line.split("│")[1].strip(): line for line in summary.splitlines() if line.startswith("│")}
    assert sorted(rows) == sorted(CLASSES)
    assert all(row.rstrip().endswith("1/1 │") for row in rows.values()), rows  # every device healthy
    assert "relu.1" in summary  # the NPU class serves the model cut in two
    assert "edge-npu: partitioned and pipelined; on the agents, per request: head" in output
    assert "edge-cpu: whole model" in output
    index = tmp_path / "report" / "index.html"
    assert f"report: {index}" in output.replace("\n", "")
    html = index.read_text(encoding="utf-8")
    for plot in ("trade-offs.png", "timeline.png", "latency.png"):
        assert (tmp_path / "report" / plot).stat().st_size > 1000
        assert plot in html
    assert all(name in html for name in CLASSES)
    assert _survivors(state) == []


@pytest.mark.parametrize(
    ("fault", "verdict"),
    [
        ("bad-model", "version 2 failed its health gate on 2 canary device(s) and was rolled back automatically"),
        ("tampered-artifact", "all 2 device(s) refused the tampered version 2"),
    ],
)
def test_each_fault_is_caught_by_the_system(tmp_path: Path, fault: str, verdict: str) -> None:
    state = tmp_path / "run"
    result = _run(state, "--fault", fault)
    output = " ".join((result.stdout + result.stderr).split())  # the console wraps long lines
    assert result.returncode == 0, output[-6000:]
    assert f"PASS {verdict}" in output
    if fault == "bad-model":
        assert "failed its health gate (ErrorRateHigh)" in output
    else:
        assert "LengthOrHashMismatchError" in output  # the agents' own reason: TUF refused the bytes
    assert (state / "report" / "index.html").is_file()
    assert _survivors(state) == []


def test_with_s3_settings_in_the_environment_the_demo_uses_a_bucket(s3_server: S3Server, tmp_path: Path) -> None:
    state = tmp_path / "s3-run"
    result = _run(state, "--inferences", "10", s3=s3_server)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 0, output[-6000:]
    assert "artifact store s3://edgefleet-demo/s3-run" in output
    assert "PASS version 1 rolled out to every device" in output
    assert not (state / "store").exists()  # the signed repository and fleet state live in the bucket
    assert _survivors(state) == []


def test_ctrl_c_stops_every_process_and_exits_130(tmp_path: Path) -> None:
    state = tmp_path / "run"
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [*DEMO[:-2], "--inferences", "100000", "--state", str(state)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_environment(),
        )
    try:
        # Interrupt once the fleet runs: agents serving, inference under way.
        deadline = time.monotonic() + 90
        while b"RolloutSucceeded" not in log.read_bytes():
            assert demo.poll() is None, log.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
            time.sleep(0.1)
        tree = psutil.Process(demo.pid).children(recursive=True)
        assert len(tree) >= 3, [p.cmdline() for p in tree]  # the gateway and two agents
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 130, log.read_text(errors="replace")[-4000:]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert "stopped by signal 2: every child process was stopped" in log.read_text(errors="replace")
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert _survivors(state) == []
    # The state is whole: no torn file, and the control plane's objects read back.
    assert _no_torn_files(state) == []
    models = LocalApi(state / "api").objects("EdgeModel")
    assert [m.edge_model().metadata.name for m in models] == ["digits"]
