"""The demo's two faults, and how the system's reaction to each is judged.

``bad-model``: version 2 is the same CNN re-exported with its input renamed (``input`` becomes
``pixels``) together with evaluation data to match, as a model team's new export might be. It
optimizes, passes the pipeline's accuracy budget and the devices' self-test (generated inputs by
the model's own input name), so it is signed, published and rolled out; but the applications on
the devices still send ``input``, every request fails, and the rollout's error-rate gate fails the
canary wave. The operator rolls it back; the demo only changes the EdgeModel file and watches.

``tampered-artifact``: version 2 (the CNN with its weights nudged, as a retraining would: other
bytes, the same accuracy) is published while the EdgeModel is paused; the demo then flips bytes in
every payload of version 2 in the artifact store (as an attacker with write access to the bucket
could) and resumes the rollout in one wave. Every agent must refuse the download (the bytes no
longer match the signed TUF targets) and keep serving version 1.

The judges are pure: observations in, a verdict out.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import onnx

from edgefleet_core.store.base import ArtifactStore

Fault = Literal["bad-model", "tampered-artifact"]
FAULTS: Final[tuple[Fault, ...]] = ("bad-model", "tampered-artifact")
BAD_INPUT_NAME: Final = "pixels"
BAD_MODEL_FILE: Final = "digits-small-cnn-v2.onnx"
BAD_DATA_FILE: Final = "digits-small-cnn-v2-data.npz"
RETRAINED_MODEL_FILE: Final = "digits-small-cnn-retrained.onnx"
MAX_TARGET_BYTES: Final = 256 * 1024 * 1024
REFUSED: Final = "refused_verification"


# ---------------------------------------------------------------------- spec changes


def renamed_input_model(model: onnx.ModelProto, new_name: str) -> onnx.ModelProto:
    """``model`` with its single graph input renamed everywhere it is read."""
    model = copy.deepcopy(model)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"the model has {len(inputs)} inputs; the bad-model fault renames a single one")
    old = inputs[0].name
    inputs[0].name = new_name
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new_name
    return model


def write_bad_model(model_path: Path, data_path: Path, folder: Path) -> tuple[Path, Path]:
    """Version 2's model and evaluation data (input renamed) in ``folder``; their paths."""
    model = renamed_input_model(onnx.load(str(model_path)), BAD_INPUT_NAME)
    with np.load(data_path) as data:
        arrays = {BAD_INPUT_NAME if name == "input" else name: data[name] for name in data.files}
    folder.mkdir(parents=True, exist_ok=True)
    bad_model, bad_data = folder / BAD_MODEL_FILE, folder / BAD_DATA_FILE
    onnx.save(model, str(bad_model))
    with bad_data.open("wb") as out:
        np.savez(out, **arrays)
    return bad_model, bad_data


def nudged_weights(model: onnx.ModelProto, *, relative: float = 1e-3, seed: int = 2) -> onnx.ModelProto:
    """``model`` with small seeded noise on every float weight: new bytes for every variant, same behaviour."""
    model = copy.deepcopy(model)
    rng = np.random.default_rng(seed)
    for initializer in model.graph.initializer:
        weights = onnx.numpy_helper.to_array(initializer)
        if weights.dtype != np.float32 or weights.ndim < 2:
            continue
        noise = rng.standard_normal(weights.shape).astype(np.float32) * relative * float(np.std(weights) or 1.0)
        initializer.CopyFrom(onnx.numpy_helper.from_array(weights + noise, initializer.name))
    return model


def write_retrained_model(model_path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RETRAINED_MODEL_FILE
    onnx.save(nudged_weights(onnx.load(str(model_path))), str(path))
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bad_model_spec(
    document: Mapping[str, Any], model_uri: str, model_sha: str, data_uri: str, data_sha: str
) -> dict[str, Any]:
    """The EdgeModel pointing at version 2's model and data."""
    changed = copy.deepcopy(dict(document))
    spec = changed["spec"]
    spec["source"] = {**spec["source"], "uri": model_uri, "sha256": model_sha}
    evaluation = spec["accuracy"]["evaluationData"]
    spec["accuracy"]["evaluationData"] = {**evaluation, "uri": data_uri, "sha256": data_sha}
    return changed


def tampered_spec(document: Mapping[str, Any], model_uri: str, model_sha: str) -> dict[str, Any]:
    """Version 2 from a retrained source, paused, with one wave for the whole fleet."""
    changed = copy.deepcopy(dict(document))
    spec = changed["spec"]
    spec["source"] = {**spec["source"], "uri": model_uri, "sha256": model_sha}
    spec["rollout"]["waves"] = [{"percent": 100}]
    spec["paused"] = True
    return changed


def resumed(document: Mapping[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(dict(document))
    changed["spec"]["paused"] = False
    return changed


def tamper_version(store: ArtifactStore, namespace: str, model: str, version: str) -> list[str]:
    """Flip bytes in the middle of every payload of ``version`` (every class); the keys changed.

    Manifests are left alone: the payloads are what an attacker would swap, and the signed
    targets metadata names both their lengths and hashes.
    """
    changed = []
    for key in store.list("tuf/targets/"):
        parts = key.split("/")
        # tuf/targets/<class>/<namespace>/<model>/<version>/[delta-from-<v>/]<hash>.<file>: full and delta payloads
        if len(parts) < 7 or parts[3:6] != [namespace, model, version] or parts[-1].endswith(".manifest.json"):
            continue
        data = bytearray(store.get(key, max_bytes=MAX_TARGET_BYTES))
        if not data:
            continue
        middle = len(data) // 2
        for offset in range(middle, min(middle + 16, len(data))):
            data[offset] ^= 0xFF
        store.put(key, bytes(data))
        changed.append(key)
    return changed


# ---------------------------------------------------------------------- judging


@dataclass(frozen=True)
class DeviceOutcome:
    """What one device did during the fault, as the demo observed it."""

    name: str
    assigned_bad: bool
    """Whether the fleet ever assigned it version 2 for install."""
    install_outcome: str | None
    """Its install report for version 2 (``succeeded``, ``rolled_back``, ``refused_verification``, ...)."""
    assigned_now: str | None
    """The version its current assignment names."""
    serving: str | None
    """The version its last successful answer came from."""


@dataclass(frozen=True)
class Verdict:
    ok: bool
    text: str


def judge_bad_model(
    devices: list[DeviceOutcome], *, good: str, bad: str, rolled_back_classes: set[str], classes: set[str]
) -> Verdict:
    """Passed when every class rolled back, the canaries serve ``good`` again and no one else got ``bad``."""
    canaries = [d for d in devices if d.assigned_bad]
    if not canaries:
        return Verdict(False, f"no device was ever assigned version {bad}: the fault was not exercised")
    if rolled_back_classes != classes:
        missing = ", ".join(sorted(classes - rolled_back_classes))
        return Verdict(False, f"the rollout of version {bad} was not rolled back in class(es) {missing}")
    stuck = [d.name for d in canaries if d.serving != good or d.assigned_now != good]
    if stuck:
        return Verdict(False, f"canary device(s) {', '.join(stuck)} did not go back to version {good}")
    others = [d for d in devices if not d.assigned_bad]
    off = [d.name for d in others if d.serving != good]
    if off:
        return Verdict(False, f"device(s) {', '.join(off)} outside the canary wave do not serve version {good}")
    return Verdict(
        True,
        f"version {bad} failed its health gate on {len(canaries)} canary device(s) and was rolled back "
        f"automatically; they serve version {good} again, and the {len(others)} device(s) of later waves "
        f"never received version {bad}",
    )


def judge_tampered(devices: list[DeviceOutcome], *, good: str, bad: str) -> Verdict:
    """Passed when every device was offered ``bad``, refused it, and serves ``good``."""
    if not devices:
        return Verdict(False, "no devices")
    not_offered = [d.name for d in devices if not d.assigned_bad]
    if not_offered:
        return Verdict(False, f"device(s) {', '.join(not_offered)} were never offered version {bad}")
    accepted = [d.name for d in devices if d.install_outcome != REFUSED]
    if accepted:
        detail = ", ".join(f"{d.name}: {d.install_outcome or 'no report'}" for d in devices if d.name in accepted)
        return Verdict(False, f"not every device refused the tampered version {bad} ({detail})")
    off = [d.name for d in devices if d.serving != good]
    if off:
        return Verdict(False, f"device(s) {', '.join(off)} do not serve version {good} after refusing {bad}")
    return Verdict(
        True,
        f"all {len(devices)} device(s) refused the tampered version {bad} (its bytes no longer match the signed "
        f"TUF targets) and kept serving version {good}",
    )
