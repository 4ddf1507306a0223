"""The build key: the content address of everything that decides what a (model, class) variant is built from.

Two reconciles with the same key would run the same pipeline on the same inputs, so the second
adopts what the first published (the key is recorded as ``lineage.buildKey`` in the signed
manifest) instead of building and publishing again. What does not change the build stays out of
the key: rollout policy, ``paused``, ``artifactPolicy``, labels, the source's URI (only its sha256
counts), the DeviceClass's description, and model versions.

The helpers here also say which recipe and partition policy a class's build really uses, so the
key and the build (:mod:`.variants`) read the spec the same way.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

from edgefleet_core.optimize.lineage import canonical_pass
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import AccuracyBudget, EdgeModel, EdgeModelSpec, Optimization, PartitionPolicy
from edgefleet_core.resources.recipe import Recipe

BUILD_KEY_VERSION: Final = 1
"""Bumped when what goes into the key changes, so old and new keys never collide."""


def effective_recipe(spec: EdgeModelSpec, device_class: str) -> Recipe | None:
    """The recipe the model gives for the class (its override, else the model's); ``None``: the class decides."""
    return spec.optimization.recipe_for(device_class) if spec.optimization is not None else None


def recipe_field(spec: EdgeModelSpec, device_class: str) -> str | None:
    """Path of the field holding the class's recipe, for errors (``None`` when the class's default applies)."""
    optimization = spec.optimization
    if optimization is None:
        return None
    for index, override in enumerate(optimization.overrides or []):
        if override.device_class == device_class:
            return f"spec.optimization.overrides[{index}].recipe"
    return "spec.optimization.recipe" if optimization.recipe is not None else None


def effective_partition(spec: EdgeModelSpec, device_class: DeviceClass) -> PartitionPolicy | None:
    """The partition policy that applies to the class; ``None`` when the whole model runs on the node CPU.

    Partitioning needs an accelerator; ``auto`` also needs the link to price a cut, while
    ``manual`` keeps applying so a class without a link is reported instead of silently ignored.
    """
    policy = spec.partition or PartitionPolicy()
    accelerator = device_class.spec.accelerator
    if policy.policy == "off" or accelerator is None:
        return None
    if policy.policy == "auto" and accelerator.link is None:
        return None
    return policy


def pinned_data_sha256(spec: EdgeModelSpec) -> str | None:
    """The evaluation data's sha256 as the spec pins it: what to pass as ``data_sha256``.

    The key must be known before anything is read (adopting a published build reads nothing), and
    the pinned digest is checked against the bytes whenever they are read.
    """
    data = spec.accuracy.evaluation_data if spec.accuracy is not None else None
    return data.sha256 if data is not None else None


def build_inputs(
    model: EdgeModel, device_class: DeviceClass, *, data_sha256: str | None, seed: int = 0
) -> dict[str, Any]:
    """The JSON-ready build inputs the key hashes (also what logs and tests show)."""
    spec = model.spec
    accuracy = spec.accuracy or AccuracyBudget()
    data = accuracy.evaluation_data
    recipe = effective_recipe(spec, device_class.metadata.name)
    partition = effective_partition(spec, device_class)
    class_spec = device_class.spec.model_dump(by_alias=True, mode="json", exclude_none=True)
    class_spec.pop("description", None)
    return {
        "keyVersion": BUILD_KEY_VERSION,
        "sourceSha256": spec.source.sha256,
        "evaluationDataSha256": data_sha256,
        "task": spec.task,
        # Canonical passes (every option defaulted): spelling out a default does not rebuild.
        "recipe": None if recipe is None else [canonical_pass(p) for p in recipe.passes],
        "objective": (spec.optimization or Optimization()).objective,
        "accuracy": {
            "metric": accuracy.metric,
            "maxDrop": accuracy.max_drop,
            "samples": data.samples if data is not None else None,
        },
        "partition": None if partition is None else partition.model_dump(by_alias=True, mode="json"),
        "deviceClass": class_spec,
        "seed": seed,
    }


def build_key(model: EdgeModel, device_class: DeviceClass, *, data_sha256: str | None, seed: int = 0) -> str:
    """Full sha256 hex of the canonical JSON of :func:`build_inputs`.

    ``data_sha256`` is the evaluation data's pinned digest (:func:`pinned_data_sha256`), or ``None``.
    """
    canonical = json.dumps(
        build_inputs(model, device_class, data_sha256=data_sha256, seed=seed),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()
