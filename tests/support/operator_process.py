"""``edgefleet operator run`` as a real process, and the resources the process tests feed it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgefleet_operator.operator_cli import READY_LINE
from tests.support.fleet import wait_for

JsonObject = dict[str, Any]
GRAPH_ONLY: JsonObject = {"passes": [{"type": "GraphOptimization"}]}
"""A recipe the pipeline runs in milliseconds on the tiny CNN."""


@contextlib.contextmanager
def running_operator(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``edgefleet operator run ARGS`` (through ``python -m``), once it says it is ready; stopped after."""
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "edgefleet_operator.operator_cli", "run", *args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:

        def ready() -> bool:
            assert popen.poll() is None, log.read_text(errors="replace")
            return READY_LINE in log.read_text(errors="replace")

        wait_for("the operator to get ready", ready, timeout=60)
        yield popen
    finally:
        popen.terminate()
        try:
            popen.wait(30)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(10)


def device_class(name: str) -> JsonObject:
    return {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "DeviceClass",
        "metadata": {"name": name},
        "spec": {"cpu": {"arch": "x86_64", "cores": 4}, "memory": "1Gi", "precisions": ["fp32"],
                 "selector": {"matchLabels": {"edgefleet.io/class": name}}},
    }  # fmt: skip


def edge_model(name: str, namespace: str, uri: str, sha256: str, classes: list[str]) -> JsonObject:
    return {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"source": {"uri": uri, "sha256": sha256}, "targets": {"deviceClasses": classes},
                 "optimization": {"recipe": GRAPH_ONLY}},
    }  # fmt: skip
