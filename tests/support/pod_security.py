"""The restricted Pod Security Standard, checked on a pod spec as the admission controller would.

Used by the Helm chart's tests and by the pipeline Job manifest's: both must be admitted by a
namespace that enforces ``restricted``. We add one rule of our own: a read-only root filesystem.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(spec: Mapping[str, Any]) -> list[str]:
    """Where a pod spec breaks the restricted Pod Security Standard (and our read-only root rule)."""
    out = _pod_violations(spec)
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        out += [f"container {container['name']}: {problem}" for problem in _container_violations(container)]
    return out


def _pod_violations(spec: Mapping[str, Any]) -> list[str]:
    pod = spec.get("securityContext", {})
    out = [f"pod: {field}" for field in ("hostNetwork", "hostPID", "hostIPC") if spec.get(field)]
    if pod.get("runAsNonRoot") is not True:
        out.append("pod: runAsNonRoot is not true")
    if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        out.append("pod: seccompProfile is not RuntimeDefault")
    if not isinstance(pod.get("runAsUser"), int) or pod["runAsUser"] == 0:
        out.append("pod: runAsUser is not a numeric non-root id")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: {sorted(kinds)}")
    return out


def _container_violations(container: Mapping[str, Any]) -> list[str]:
    context = container.get("securityContext", {})
    capabilities = context.get("capabilities", {})
    checks = {
        "allowPrivilegeEscalation is not false": context.get("allowPrivilegeEscalation") is not False,
        "privileged": bool(context.get("privileged")),
        "does not drop ALL capabilities": "ALL" not in capabilities.get("drop", []),
        "adds capabilities": bool(set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}),
        "runs as root": context.get("runAsNonRoot") is False or context.get("runAsUser") == 0,
        "root filesystem is writable": context.get("readOnlyRootFilesystem") is not True,
        "seccompProfile is not RuntimeDefault": context.get("seccompProfile", {}).get("type", "RuntimeDefault")
        != "RuntimeDefault",
        "hostPort": any(port.get("hostPort") for port in container.get("ports", [])),
    }
    return [problem for problem, found in checks.items() if found]
