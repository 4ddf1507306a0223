"""The device agent runs with exactly what agent/requirements.txt installs, and nothing heavier.

The agent image (agent/Dockerfile) and bare-device installs get `edgefleet` with ``--no-deps`` plus
that list. These tests prove the list is enough and pinned: a child interpreter refuses every
third-party module whose distribution is not on it, then runs the agent's CLI and a real inference
(a tensor-codec bundle decoded, self-tested, served in-process and over the local gRPC API).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from packaging.utils import canonicalize_name

from edgefleet_core.bundle.codec import encode_model
from tests.support.requirements import pinned
from tests.support.tiny_models import tiny_matmul_bytes

ROOT = Path(__file__).resolve().parents[3]
REQUIREMENTS = ROOT / "agent" / "requirements.txt"

OPERATOR_ONLY = ("kopf", "aiohttp", "jsonpatch", "cel-python", "lark", "minio", "matplotlib", "torch", "scikit-learn")
"""Distributions of the operator side and the `train` extra: never on a device."""
OPERATOR_ONLY_MODULES = ("kopf", "aiohttp", "jsonpatch", "celpy", "lark", "minio", "matplotlib", "torch", "sklearn")


def test_requirements_are_pinned_without_operator_packages() -> None:
    # That the list is a complete closure (--no-deps installs nothing else) is checked with the
    # operator image's list in tests/unit/test_images.py.
    assert {canonicalize_name(d) for d in OPERATOR_ONLY}.isdisjoint(pinned(REQUIREMENTS))


CHILD = r"""
import asyncio, importlib.abc, importlib.machinery, json, site, sys
from importlib.metadata import packages_distributions
from pathlib import Path

config = json.loads(Path(sys.argv[1]).read_text())
allowed_dists = set(config["allowed"])
canon = lambda name: name.lower().replace("_", "-").replace(".", "-")
dists_of = packages_distributions()
allowed = {m for m, dists in dists_of.items() if any(canon(d) in allowed_dists for d in dists)}
blocked_explicitly = set(config["operator_only"])


site_packages = [str(Path(p).resolve()) for p in site.getsitepackages()]


def installed_third_party(top):
    # Whether `top` comes from site-packages (the standard library has private modules such as
    # _sysconfigdata_* that sys.stdlib_module_names does not name).
    spec = importlib.machinery.PathFinder.find_spec(top)
    if spec is None:
        return False
    places = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
    return any(str(Path(p).resolve()).startswith(tuple(site_packages)) for p in places)


class AgentImageOnly(importlib.abc.MetaPathFinder):
    # What the agent image holds: the standard library, edgefleet, and the listed distributions.
    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top in sys.stdlib_module_names or top.startswith("edgefleet_"):
            return None
        if top in blocked_explicitly or (top not in allowed and installed_third_party(top)):
            raise ModuleNotFoundError(f"No module named {top!r} (not in the agent image)", name=top)
        return None


before = {m.partition(".")[0] for m in sys.modules}
sys.meta_path.insert(0, AgentImageOnly())
for name in config["operator_only"]:
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"the blocker let {name} through")

from typer.testing import CliRunner
from edgefleet_core.cli.main import build_app

runner = CliRunner()
help_run = runner.invoke(build_app(), ["agent", "run", "--help"])
assert help_run.exit_code == 0, (help_run.output, repr(help_run.exception))
status = runner.invoke(build_app(), ["agent", "status", "--state", config["state"], "--json"])
assert status.exit_code == 0, (status.output, repr(status.exception))

import numpy as np
from grpc import aio
from edgefleet_agent.inference_server import start_inference_server, tensor_message
from edgefleet_agent.runtime import ModelRuntime
from edgefleet_core.bundle.codec import decode_model
from edgefleet_core.bundle.selftest import make_self_test
from edgefleet_proto.v1 import inference_pb2, inference_pb2_grpc

encoded = config["encoded"]
model = decode_model(
    Path(encoded["payload"]).read_bytes(), encoded["codec"],
    expected_sha256=encoded["sha256"], expected_length=encoded["length"],
)
files = {"model.onnx": model}
runtime = ModelRuntime()
loaded = runtime.load("edge", "tiny", "1.0.0", files, slot="a")
failure = runtime.self_test(loaded, make_self_test(files))
assert failure is None, failure
runtime.activate(loaded)
x = np.asarray(config["input"], np.float32)
[(_, local)] = runtime.predict("tiny", {"x": x}, namespace="edge").outputs


async def over_grpc():
    server, port = await start_inference_server(runtime, "edge", "127.0.0.1:0")
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            reply = await stub.Predict(inference_pb2.PredictRequest(model_name="tiny", inputs=[tensor_message("x", x)]))
    finally:
        await server.stop(None)
    [out] = reply.outputs
    return np.frombuffer(out.data, np.float32).reshape(tuple(out.shape))


remote = asyncio.run(over_grpc())
imported = sorted({m.partition(".")[0] for m in sys.modules} - before)
third_party = {
    m: dists_of.get(m, [])
    for m in imported
    if m not in sys.stdlib_module_names and not m.startswith("edgefleet_")
    and (m in dists_of or installed_third_party(m))
}
print(json.dumps({
    "help": help_run.output,
    "status": json.loads(status.output),
    "local": local.tolist(),
    "remote": remote.tolist(),
    "third_party": third_party,
}))
"""


@pytest.mark.integration
def test_the_agent_enrolls_nothing_but_serves_with_only_its_requirements(tmp_path: Path) -> None:
    pins = pinned(REQUIREMENTS)
    data = tiny_matmul_bytes(3)
    encoded = encode_model(data)
    payload = tmp_path / "model.payload"
    payload.write_bytes(encoded.payload)
    x = np.random.default_rng(5).standard_normal((1, 8)).astype(np.float32)
    (tmp_path / "state").mkdir()
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "allowed": sorted(pins),
                "operator_only": list(OPERATOR_ONLY_MODULES),
                "state": str(tmp_path / "state"),
                "encoded": {
                    "payload": str(payload),
                    "codec": encoded.codec,
                    "sha256": encoded.sha256,
                    "length": encoded.length,
                },
                "input": x.tolist(),
            }
        )
    )
    # -I: no PYTHONPATH, user site or current folder; the installed edgefleet and site-packages only.
    done = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, str(config)], capture_output=True, text=True, timeout=90, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    for option in ("--state", "--gateway", "--enroll-gateway", "--gateway-ca", "--tuf-root", "--token-file"):
        assert option in result["help"]
    assert result["status"]["identity"] is None
    expected = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.asarray(result["local"]), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(result["remote"]), expected, rtol=1e-6)

    third_party: dict[str, list[str]] = result["third_party"]
    assert third_party, "the child imported no third-party module: it did not run the agent"
    assert {"numpy", "onnxruntime", "grpc"} <= set(third_party)
    assert set(OPERATOR_ONLY_MODULES).isdisjoint(third_party)
    unlisted = {m: d for m, d in third_party.items() if not {canonicalize_name(x) for x in d} & set(pins)}
    assert not unlisted, f"the agent imports modules no distribution on agent/requirements.txt provides: {unlisted}"
