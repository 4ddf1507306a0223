"""A real TUF repository in a LocalStore with published bundles, and tiny models, for the agent's tests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet_agent.assignments import Action, AssignmentSpec
from edgefleet_core.bundle.distribution import MANIFEST, BundleRef, build_bundles, publish_bundles
from edgefleet_core.bundle.selftest import SelfTest, make_self_test
from edgefleet_core.signing import KeySet, StoreFetcher, TufClient, TufRepository
from edgefleet_core.store.local import LocalStore
from tests.support.tiny_models import tiny_cnn

DEVICE_CLASS = "cpu-small"
NAMESPACE = "vision"
MODEL = "digits"


def model_bytes(seed: int) -> bytes:
    """The tiny CNN (input ``input`` [N,1,8,8] float32, output ``logits`` [N,10]) with weights from ``seed``."""
    return tiny_cnn(seed=seed).SerializeToString()


def head_tail(seed: int = 0) -> dict[str, bytes]:
    """A two-stage model: head ``x`` [N,16] → MatMul → ``cut``; tail ``cut`` → Relu → MatMul → ``y`` [N,4]."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(0, 0.5, (16, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.5, (8, 4)).astype(np.float32), "w2")
    head = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["cut"])],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("cut", TensorProto.FLOAT, ["N", 8])],
        [w1],
    )
    tail = helper.make_graph(
        [helper.make_node("Relu", ["cut"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "tail",
        [helper.make_tensor_value_info("cut", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w2],
    )
    return {"head.onnx": _serialize(head), "tail.onnx": _serialize(tail)}


def wide_identity(features: int) -> bytes:
    """``x`` [N, features] float32 → Relu → ``y``: for tensors larger than one 1 MiB chunk."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", features])],
    )
    return _serialize(graph)


def _serialize(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass
class BundleWorld:
    """One signed repository in a LocalStore under ``tuf/``, as `edgefleet publish --store` writes it."""

    root: Path
    store: LocalStore = field(init=False)
    repo: TufRepository = field(init=False)
    trusted_root: bytes = field(init=False)
    published: dict[str, Mapping[str, bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.store = LocalStore(self.root / "store")
        self.repo = TufRepository(self.store, KeySet.generate())
        self.repo.initialize()
        self.trusted_root = self.repo.trusted_root()

    def publish(
        self,
        version: str,
        files: Mapping[str, bytes],
        *,
        self_test: SelfTest | str | None = "compute",
        base: str | None = None,
        model: str = MODEL,
    ) -> None:
        """Publish ``files`` as ``version`` (with a delta against ``base``); the self-test computed by default."""
        test = make_self_test(files) if self_test == "compute" else self_test
        assert not isinstance(test, str)
        ref = BundleRef(NAMESPACE, model, DEVICE_CLASS)
        bundles = build_bundles(
            files,
            ref,
            version,
            variant_id="ab" * 32,
            lineage={},
            recipe=[],
            metrics={},
            base=(base, self.published[base]) if base else None,
            self_test=test,
        )
        publish_bundles(self.repo, bundles)
        self.published[version] = files

    def client(self, state: Path) -> TufClient:
        """A device's TUF client whose verified metadata lives under ``state``."""
        return TufClient(StoreFetcher(self.store), self.trusted_root, state / "tuf" / "metadata")

    def assignment(
        self, version: str, revision: int, action: Action = "install", *, model: str = MODEL
    ) -> AssignmentSpec:
        """What the control plane would assign: target paths and digest from the signed metadata."""
        path = f"{DEVICE_CLASS}/{NAMESPACE}/{model}/{version}/{MANIFEST}"
        info = self.client(self.root / "control-plane").target_info(path)
        return AssignmentSpec(
            revision=revision,
            model_namespace=NAMESPACE,
            model_name=model,
            version=version,
            action=action,
            target_paths=(path,),
            bundle_sha256=info.hashes["sha256"] if info else "0" * 64,
            bundle_length=info.length if info else 0,
        )

    def payload_keys(self, version: str, model: str = MODEL) -> list[str]:
        """Store keys of a version's full-bundle payloads (``.eft`` files)."""
        prefix = f"tuf/targets/{DEVICE_CLASS}/{NAMESPACE}/{model}/{version}/"
        return [k for k in self.store.list(prefix) if k.endswith(".eft") and "/delta-from-" not in k]
