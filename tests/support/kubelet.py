"""A tiny kubelet for the test API server, which stores Jobs but runs no pods.

It watches for Jobs, runs each one's container command as a real process with the Job's
environment (``edgefleet pipeline-job`` through ``python -m``, so it does not depend on the entry
point being installed) and writes the outcome into the Job's status (one pod, no retries).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any

from edgefleet_operator.devtools.kube_api import ApiError
from edgefleet_operator.jobs.manifest import CONTAINER, EXIT_REFUSED, MODEL_LABEL
from tests.support.kube_api import KubeApiServer

PIPELINE_JOB = [sys.executable, "-m", "edgefleet_operator.jobs.pipeline_job"]
JsonObject = dict[str, Any]


class Kubelet:
    """Runs every Job it sees once, as a process, and reports the pod's end in the Job's status."""

    def __init__(
        self, server: KubeApiServer, logs: Path, namespace: str, *, never_start_once: Collection[str] = ()
    ) -> None:
        """``never_start_once``: models whose first Job's pod never starts (an image that does not pull)."""
        self.server = server
        self.logs = logs
        self.namespace = namespace
        self.exits: dict[str, int] = {}
        """Job name → exit code of its latest pod (-1: the pod never started)."""
        self._seen: set[str] = set()  # Job uids: a Job deleted and made again under its name runs again
        self._never_start_once = set(never_start_once)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubelet")
        self.failures: list[BaseException] = []

    def __enter__(self) -> Kubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive(), "the kubelet did not stop"
        assert not self.failures, self.failures

    def _pending(self) -> list[JsonObject] | None:
        if self._stop.is_set():
            return None
        return [j for j in self.server.list("jobs", self.namespace) if j["metadata"]["uid"] not in self._seen] or None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):  # nothing new: look again (the stop flag too)
                    pending = self.server.wait_until(lambda: self._pending() or self._stop.is_set(), timeout=1.0)
                    for job in pending if isinstance(pending, list) else []:
                        self._start(job)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the test's thread on exit)
            self.failures.append(exc)

    def _start(self, job: JsonObject) -> None:
        name = job["metadata"]["name"]
        self._seen.add(job["metadata"]["uid"])
        model = job["metadata"].get("labels", {}).get(MODEL_LABEL)
        if model in self._never_start_once:
            self._never_start_once.discard(model)
            self.exits[name] = -1
            failed = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "ImagePullBackOff"}
            self._status(name, {"active": 0, "failed": 1, "conditions": [failed]})
            return
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["name"] == CONTAINER
        assert container["command"][:2] == ["edgefleet", "pipeline-job"]
        env = {**os.environ, **{e["name"]: e["value"] for e in container.get("env", [])}}
        # Each emptyDir the pod mounts is a fresh folder of its own, as the kubelet makes them.
        for mount in container.get("volumeMounts", []):
            scratch = self.logs / f"{name}-{mount['name']}"
            scratch.mkdir(exist_ok=True)
            env = {k: str(scratch) + v[len(mount["mountPath"]) :] if v.startswith(f"{mount['mountPath']}/") else v
                   for k, v in env.items()}  # fmt: skip
        self._status(name, {"active": 1})
        with (self.logs / f"{name}.log").open("wb") as log:
            code = subprocess.run(
                [*PIPELINE_JOB, *container["command"][2:]], env=env, stdout=log, stderr=subprocess.STDOUT,
                timeout=90, check=False,
            ).returncode  # fmt: skip
        self.exits[name] = code
        if code == 0:
            self._status(name, {"active": 0, "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
        else:
            reason = "PodFailurePolicy" if code == EXIT_REFUSED else "BackoffLimitExceeded"
            failed = {"type": "Failed", "status": "True", "reason": reason, "message": f"exit code {code}"}
            self._status(name, {"active": 0, "failed": 1, "conditions": [failed]})

    def _status(self, name: str, status: JsonObject) -> None:
        try:
            self.server.patch("jobs", name, {"status": status}, namespace=self.namespace, subresource="status")
        except ApiError as exc:
            if exc.code != 404:  # deleted while it ran (its model went): a real kubelet's pod just dies
                raise
