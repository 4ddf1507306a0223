"""Real inputs for the reconciler's tests: model and data files, DeviceClasses, EdgeModels, a signed repository.

Nothing of ours is mocked: sources are real files (a tiny CNN from ``tests/support/tiny_models.py``
and an ``.npz`` of its inputs), read through :class:`SourceResolver`; bundles go into a real TUF
repository in a :class:`LocalStore` through the real :class:`Publisher`.

What it provides (for any test in this folder):

- constants ``NAMESPACE``, ``MODEL``, ``CPU`` / ``NPU`` (class names), ``GRAPH_ONLY`` (a
  GraphOptimization-only recipe: the pipeline takes milliseconds on the tiny CNN);
- builders :func:`device_class` (CPU-only, or with an accelerator and link) and :func:`edge_model`
  (an EdgeModel over a staged source, with spec fields given in their CRD spelling);
- fixtures ``source_file`` (the tiny CNN as ``model.onnx``: path, ``file://`` URI, sha256),
  ``eval_data`` (an ``.npz`` with 40 inputs and labels), ``cpu_class``, ``npu_class``, ``resolver``
  (a :class:`SourceResolver` whose base folder holds both files), ``keys`` (a session key set),
  ``store`` (an empty :class:`LocalStore`) and ``publisher`` (an initialized :class:`Publisher` on it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from edgefleet_core.bundle.publisher import Publisher
from edgefleet_core.optimize.runtime import run, session
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import EdgeModel
from edgefleet_core.signing import KeySet
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.reconcile.sources import SourceResolver
from tests.support.tiny_models import tiny_cnn, tiny_inputs

NAMESPACE = "factory"
MODEL = "digits"
CPU = "cpu-small"
NPU = "npu-kiosk"
GRAPH_ONLY: dict[str, Any] = {"passes": [{"type": "GraphOptimization"}]}
"""A recipe the pipeline runs in milliseconds on the tiny CNN."""


@dataclass(frozen=True)
class StagedFile:
    """A file written for a test, with how a spec names and pins it."""

    path: Path
    uri: str
    """``file:///abs/path``."""
    sha256: str


def stage(path: Path, data: bytes) -> StagedFile:
    """Write ``data`` to ``path``; the staged file."""
    path.write_bytes(data)
    return StagedFile(path, path.as_uri(), hashlib.sha256(data).hexdigest())


def device_class(
    name: str,
    *,
    labels: dict[str, str] | None = None,
    accelerator: bool = False,
    link: bool = True,
    memory: str = "1Gi",
    description: str | None = None,
    default_recipe: dict[str, Any] | None = None,
) -> DeviceClass:
    """A DeviceClass: CPU-only, or with an OpenVINO NPU (and its link unless ``link=False``)."""
    spec: dict[str, Any] = {
        "cpu": {"arch": "x86_64", "cores": 4},
        "memory": memory,
        "selector": {"matchLabels": {"edgefleet.io/class": name}},
    }
    if accelerator:
        spec["accelerator"] = {"type": "npu", "executionProvider": "OpenVINOExecutionProvider"}
        if link:
            spec["accelerator"]["link"] = {"bandwidthMBps": 320, "latencyMicroseconds": 400}
    if description is not None:
        spec["description"] = description
    if default_recipe is not None:
        spec["defaultRecipe"] = default_recipe
    return DeviceClass.model_validate({"metadata": {"name": name, "labels": labels or {}}, "spec": spec})


def edge_model(
    source: StagedFile,
    *,
    name: str = MODEL,
    namespace: str = NAMESPACE,
    generation: int = 1,
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> EdgeModel:
    """An EdgeModel over ``source``; ``spec`` fields in their CRD spelling replace the defaults.

    Defaults: targets ``CPU`` by name, the :data:`GRAPH_ONLY` recipe.
    """
    body: dict[str, Any] = {
        "source": {"uri": source.uri, "sha256": source.sha256},
        "targets": {"deviceClasses": [CPU]},
        "optimization": {"recipe": GRAPH_ONLY},
        **spec,
    }
    return EdgeModel.model_validate(
        {
            "metadata": {"name": name, "namespace": namespace, "generation": generation, "labels": labels or {}},
            "spec": body,
        }
    )


def model_bytes(model: onnx.ModelProto) -> bytes:
    """Deterministic bytes of a model (what a source file holds)."""
    return model.SerializeToString(deterministic=True)


@pytest.fixture
def source_file(tmp_path: Path) -> StagedFile:
    """The tiny CNN (input ``input`` [N,1,8,8], output ``logits`` [N,10]) as ``model.onnx``."""
    return stage(tmp_path / "model.onnx", model_bytes(tiny_cnn()))


@pytest.fixture
def eval_data(tmp_path: Path) -> StagedFile:
    """40 inputs for the tiny CNN with integer labels (the FP32 model's own predictions: top-1 is 1.0)."""
    inputs = tiny_inputs(40)
    logits = run(session(tiny_cnn()), None, {"input": inputs})[0]
    labels = np.argmax(logits, axis=1).astype(np.int64)
    path = tmp_path / "eval.npz"
    with path.open("wb") as handle:
        np.savez(handle, input=inputs, labels=labels)
    return StagedFile(path, path.as_uri(), hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.fixture
def cpu_class() -> DeviceClass:
    return device_class(CPU, labels={"tier": "small"})


@pytest.fixture
def npu_class() -> DeviceClass:
    return device_class(NPU, labels={"tier": "kiosk", "accelerated": "yes"}, accelerator=True)


@pytest.fixture
def resolver(tmp_path: Path) -> SourceResolver:
    """Local mode: relative sources resolve against the folder ``source_file`` and ``eval_data`` are in."""
    return SourceResolver(base_dir=tmp_path)


@pytest.fixture(scope="session")
def keys() -> KeySet:
    return KeySet.generate()


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    root = tmp_path / "store"
    root.mkdir()
    return LocalStore(root)


@pytest.fixture
def publisher(store: LocalStore, keys: KeySet) -> Publisher:
    """An initialized publisher (root, targets, snapshot, timestamp signed) over ``store``."""
    built = Publisher(store, keys)
    built.ensure_initialized()
    return built
