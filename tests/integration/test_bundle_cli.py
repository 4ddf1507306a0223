"""Signed bundles through the real CLI: optimize → publish → fetch gives byte-identical files, on both stores."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from edgefleet_core.cli.main import build_app
from edgefleet_core.optimize.model_io import serialize
from edgefleet_core.samples.digits import load_digits_split, save_npz
from edgefleet_core.store.s3 import minio_client
from tests.support.s3_server import S3Server, s3_server
from tests.support.tiny_models import tiny_cnn

pytestmark = pytest.mark.integration
__all__ = ["s3_server"]  # the session fixture, used by name below
ROOT = Path(__file__).resolve().parents[2]
CPU_CLASS = ROOT / "examples" / "valid" / "deviceclass-x86-cpu.yaml"
runner = CliRunner()


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(build_app(), list(args))
    return result.exit_code, result.stdout + result.stderr


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An `edgefleet optimize` output folder (model.onnx, report.json) of a small CNN on digits."""
    folder = tmp_path_factory.mktemp("optimized")
    source = folder / "source.onnx"
    source.write_bytes(serialize(tiny_cnn(channels=16)))
    split = load_digits_split()
    save_npz(folder / "data.npz", split.test.images[:120], split.test.labels[:120])
    code, output = cli("optimize", str(source), "--device-class", str(CPU_CLASS), "--data", str(folder / "data.npz"),
                       "--out", str(folder / "out"), "--no-cache", "--max-accuracy-drop", "100")  # fmt: skip
    assert code == 0, output
    return folder / "out"


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    server: S3Server = request.getfixturevalue("s3_server")
    bucket = f"bundles-{uuid.uuid4().hex[:16]}"
    minio_client(server.endpoint, access_key=server.access_key, secret_key=server.secret_key, secure=False,
                 region=server.region).make_bucket(bucket)  # fmt: skip
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    monkeypatch.setenv("AWS_REGION", server.region)
    return f"s3://{bucket}/fleet"


def _publish(store: str, keys: Path, version: str, *files: Path, report: Path | None = None) -> tuple[int, str]:
    extra = ["--report", str(report)] if report else []
    return cli("publish", *map(str, files), "--store", store, "--keys", str(keys), "--model", "digits",
               "--version", version, "--device-class", "x86-cpu", "--namespace", "vision", *extra)  # fmt: skip


def _fetch(store: str, keys: Path, out: Path, meta: Path, *extra: str) -> tuple[int, str]:
    return cli("fetch", "--store", store, "--trusted-root", str(keys / "root.json"), "--model", "digits",
               "--device-class", "x86-cpu", "--namespace", "vision", "--out", str(out), "--metadata-dir",
               str(meta), *extra)  # fmt: skip


def test_pipeline_output_round_trips_byte_identical(optimized: Path, store: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert cli("keys", "init", str(keys))[0] == 0
    code, output = _publish(store, keys, "1.0.0", optimized / "model.onnx", report=optimized / "report.json")
    assert code == 0, output
    assert "initialized the repository" in output
    out = tmp_path / "device"
    code, output = _fetch(store, keys, out, tmp_path / "meta")
    assert code == 0, output
    assert (out / "model.onnx").read_bytes() == (optimized / "model.onnx").read_bytes()
    manifest = yaml.safe_load((out / "manifest.json").read_text())
    report = yaml.safe_load((optimized / "report.json").read_text())
    assert manifest["variantId"] == report["chosenVariantId"]
    assert manifest["deviceClass"] == "x86-cpu"


def test_a_head_only_update_travels_as_a_delta(optimized: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    store = f"file://{tmp_path / 'store'}"
    keys = tmp_path / "keys"
    cli("keys", "init", str(keys))
    first = optimized / "model.onnx"
    assert _publish(store, keys, "1", first)[0] == 0
    model = onnx.load(str(first))
    gemm = next(n for n in model.graph.node if n.op_type in ("Gemm", "QGemm", "MatMul", "QLinearMatMul"))
    head = next(i for i in model.graph.initializer if i.name in gemm.input and i.data_type == onnx.TensorProto.FLOAT)
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * np.float32(1.5), head.name))
    second = tmp_path / "v2" / "model.onnx"
    second.parent.mkdir()
    second.write_bytes(model.SerializeToString())
    code, output = _publish(store, keys, "2", second)
    assert code == 0, output
    assert "delta x86-cpu/vision/digits/2/delta-from-1" in output
    meta = tmp_path / "meta"
    assert _fetch(store, keys, tmp_path / "v1-out", meta, "--version", "1")[0] == 0
    code, output = _fetch(store, keys, tmp_path / "v2-out", meta, "--base", str(tmp_path / "v1-out"))
    assert code == 0, output
    assert "as a delta" in output
    assert (tmp_path / "v2-out" / "model.onnx").read_bytes() == second.read_bytes()


def test_a_tampered_payload_is_refused_and_nothing_is_written(optimized: Path, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    keys = tmp_path / "keys"
    cli("keys", "init", str(keys))
    assert _publish(f"file://{store_dir}", keys, "1", optimized / "model.onnx")[0] == 0
    payload = next(p for p in (store_dir / "tuf" / "targets").rglob("*.model.onnx.eft"))
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF
    payload.write_bytes(bytes(data))
    out = tmp_path / "device"
    code, output = _fetch(f"file://{store_dir}", keys, out, tmp_path / "meta")
    assert code == 1
    assert "model.onnx.eft" in output
    assert not out.exists()


def test_a_rolled_back_repository_is_refused(optimized: Path, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    keys = tmp_path / "keys"
    cli("keys", "init", str(keys))
    assert _publish(f"file://{store_dir}", keys, "1", optimized / "model.onnx")[0] == 0
    timestamp = store_dir / "tuf" / "metadata" / "timestamp.json"
    old = timestamp.read_bytes()
    assert _publish(f"file://{store_dir}", keys, "2", optimized / "model.onnx")[0] == 0
    meta = tmp_path / "meta"
    assert _fetch(f"file://{store_dir}", keys, tmp_path / "a", meta)[0] == 0
    timestamp.write_bytes(old)  # an attacker serves yesterday's timestamp
    code, output = _fetch(f"file://{store_dir}", keys, tmp_path / "b", meta)
    assert code == 1
    assert "BadVersionNumber" in output or "version" in output.lower()
    assert not (tmp_path / "b").exists()


def test_keys_go_into_a_kubernetes_secret(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert cli("keys", "init", str(keys), "--root-keys", "3", "--root-threshold", "2")[0] == 0
    code, output = cli("keys", "secret", str(keys), "--namespace", "edge")
    assert code == 0, output
    secret = yaml.safe_load(output)
    assert secret["kind"] == "Secret"
    assert secret["metadata"]["namespace"] == "edge"
    from edgefleet_core.signing.keys import KeySet

    restored = KeySet.from_secret_data(secret["data"])
    assert restored.online_only  # the operator's Secret carries no root private key
    assert restored.to_files() == KeySet.load(keys).to_files(online_only=True)
    code, output = cli("keys", "init", str(keys))
    assert code == 1  # never silently replace signing keys


def test_keys_root_creates_the_repository_once_and_then_only_reads_it(tmp_path: Path) -> None:
    store = f"file://{tmp_path / 'store'}"
    keys = tmp_path / "keys"
    assert cli("keys", "init", str(keys))[0] == 0
    secret = yaml.safe_load(cli("keys", "secret", str(keys))[1])
    online = tmp_path / "online"  # what the operator mounts: no root private key
    online.mkdir()
    from edgefleet_core.signing.keys import KeySet

    KeySet.from_secret_data(secret["data"]).save(online)
    code, output = cli("keys", "root", "--store", store, "--keys", str(online), "--out", str(tmp_path / "r0.json"))
    assert code == 1
    assert "only the online keys" in output
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "r0.json").exists()
    code, output = cli("keys", "root", "--store", store, "--keys", str(keys), "--out", str(tmp_path / "r1.json"))
    assert code == 0, output
    assert "created the repository" in output
    code, output = cli("keys", "root", "--store", store, "--keys", str(online), "--out", str(tmp_path / "r2.json"))
    assert code == 0, output
    assert "created" not in output
    assert (tmp_path / "r1.json").read_bytes() == (tmp_path / "r2.json").read_bytes()
    assert json.loads((tmp_path / "r1.json").read_bytes())["signed"]["_type"] == "root"


def test_root_rotation_through_the_cli(optimized: Path, tmp_path: Path) -> None:
    store = f"file://{tmp_path / 'store'}"
    old, new = tmp_path / "old", tmp_path / "new"
    cli("keys", "init", str(old))
    cli("keys", "init", str(new))
    assert _publish(store, old, "1", optimized / "model.onnx")[0] == 0
    code, output = cli("keys", "rotate", "--store", store, "--keys", str(old), "--new-keys", str(new))
    assert code == 0, output
    assert "root is now version 2" in output
    (new / "root.json").write_bytes((old / "root.json").read_bytes())  # devices keep trusting root v1
    assert _publish(store, new, "2", optimized / "model.onnx")[0] == 0
    code, output = _fetch(store, new, tmp_path / "device", tmp_path / "meta")
    assert code == 0, output  # a v1-trusting client follows the chain to root v2 and the new keys
    assert "digits 2" in output
    # The rotated-out keys can no longer publish anything a client accepts.
    code, _ = _publish(store, old, "3", optimized / "model.onnx")
    assert code == 1


def test_the_timestamp_is_refreshed_with_the_online_keys(optimized: Path, tmp_path: Path) -> None:
    store = f"file://{tmp_path / 'store'}"
    keys = tmp_path / "keys"
    cli("keys", "init", str(keys))
    assert _publish(store, keys, "1", optimized / "model.onnx")[0] == 0
    code, output = cli("keys", "refresh", "--store", store, "--keys", str(keys))
    assert code == 0, output
    assert "timestamp is now version 3" in output
    assert _fetch(store, keys, tmp_path / "device", tmp_path / "meta")[0] == 0


def test_fetch_never_replaces_a_folder_that_is_not_its_output(optimized: Path, tmp_path: Path) -> None:
    store = f"file://{tmp_path / 'store'}"
    keys = tmp_path / "keys"
    cli("keys", "init", str(keys))
    assert _publish(store, keys, "1", optimized / "model.onnx")[0] == 0
    web_app = tmp_path / "web-app"
    web_app.mkdir()
    (web_app / "manifest.json").write_text('{"name": "my web app"}', encoding="utf-8")
    (web_app / "index.html").write_text("<html></html>", encoding="utf-8")
    code, output = _fetch(store, keys, web_app, tmp_path / "meta")
    assert code == 1
    assert "is not an earlier `edgefleet fetch` output" in output
    assert (web_app / "index.html").exists()


@pytest.mark.parametrize("names", [["foo.onnx"], ["model.onnx", "tail.onnx"], ["head.onnx"]])
def test_publish_names_the_file_names_a_device_loads(tmp_path: Path, names: list[str]) -> None:
    source = serialize(tiny_cnn(channels=4))
    paths = []
    for name in names:
        (tmp_path / name).write_bytes(source)
        paths.append(str(tmp_path / name))
    code, output = cli("keys", "init", str(tmp_path / "keys"))
    assert code == 0, output
    code, output = cli("publish", *paths, "--store", f"file://{tmp_path / 'store'}", "--keys", str(tmp_path / "keys"),
                       "--model", "m", "--version", "1", "--device-class", "x", "--no-self-test")  # fmt: skip
    assert code == 1
    assert "model.onnx, or head.onnx and tail.onnx" in output
    assert not (tmp_path / "store").exists()


def test_keys_commands_reach_s3_through_their_options_alone(s3_server: S3Server, tmp_path: Path) -> None:
    """No AWS_* environment: --endpoint, --access-key, --secret-key and --region say it all."""
    bucket = f"keys-{uuid.uuid4().hex[:16]}"
    minio_client(s3_server.endpoint, access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                 secure=False, region=s3_server.region).make_bucket(bucket)  # fmt: skip
    s3 = ["--endpoint", s3_server.url, "--access-key", s3_server.access_key, "--secret-key", s3_server.secret_key,
          "--region", s3_server.region]  # fmt: skip
    store, old, new = f"s3://{bucket}/fleet", tmp_path / "old", tmp_path / "new"
    cli("keys", "init", str(old))
    cli("keys", "init", str(new))
    code, output = cli("keys", "root", "--store", store, "--keys", str(old), "--out", str(tmp_path / "root.json"), *s3)
    assert code == 0, output
    code, output = cli("keys", "refresh", "--store", store, "--keys", str(old), *s3)
    assert code == 0, output
    code, output = cli("keys", "rotate", "--store", store, "--keys", str(old), "--new-keys", str(new), *s3)
    assert code == 0, output
    assert "root is now version 2" in output
