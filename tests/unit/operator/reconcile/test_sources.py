"""Sources and evaluation data: every URI form, size and digest checks, and errors that name the field."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from minio import Minio

from edgefleet_core.optimize.model_io import LoadedModel, load_model
from edgefleet_core.resources.edge_model import AccuracyBudget, ModelSource
from edgefleet_core.store.s3 import RetryPolicy
from edgefleet_operator.reconcile import SourceResolver, SpecError, TransientError
from tests.support.s3_server import S3Server, s3_server
from tests.support.tiny_models import tiny_cnn, tiny_inputs
from tests.unit.operator.reconcile.conftest import StagedFile, model_bytes, stage

__all__ = ["s3_server"]  # the session fixture, used by name below

NO_RETRY = RetryPolicy(attempts=1)


def _spec_error(call: object, *args: object, **kwargs: object) -> SpecError:
    assert callable(call)
    with pytest.raises(SpecError) as caught:
        call(*args, **kwargs)
    return caught.value


# -- files ----------------------------------------------------------------------------------------


def test_reads_an_absolute_file_uri(source_file: StagedFile) -> None:
    data = SourceResolver().read(source_file.uri, source_file.sha256, field="spec.source")
    assert data == source_file.path.read_bytes()


@pytest.mark.parametrize("form", ["model.onnx", "./model.onnx", "file:model.onnx", "file://./model.onnx"])
def test_relative_forms_resolve_against_the_base_folder(
    resolver: SourceResolver, source_file: StagedFile, form: str
) -> None:
    assert resolver.read(form, source_file.sha256, field="spec.source") == source_file.path.read_bytes()


def test_relative_sources_need_local_mode(source_file: StagedFile) -> None:
    error = _spec_error(SourceResolver().read, "file://./model.onnx", source_file.sha256, field="spec.source")
    assert error.field == "spec.source.uri"
    assert "local mode" in error.message


def test_sha256_mismatch_names_both_digests(source_file: StagedFile) -> None:
    wrong = "0" * 64
    error = _spec_error(SourceResolver().read, source_file.uri, wrong, field="spec.source")
    assert error.field == "spec.source.sha256"
    assert error.message == f"the file's sha256 is {source_file.sha256}, the spec says {wrong}"


def test_unreadable_files_name_the_uri(tmp_path: Path, source_file: StagedFile) -> None:
    resolver = SourceResolver(base_dir=tmp_path)
    missing = _spec_error(resolver.read, (tmp_path / "gone.onnx").as_uri(), "0" * 64, field="spec.source")
    assert (missing.field, missing.message) == ("spec.source.uri", f"no file at {tmp_path / 'gone.onnx'}")
    folder = _spec_error(resolver.read, tmp_path.as_uri(), "0" * 64, field="spec.accuracy.evaluationData")
    assert folder.field == "spec.accuracy.evaluationData.uri"
    assert _spec_error(resolver.read, "file://otherhost/x.onnx", "0" * 64, field="spec.source").field == (
        "spec.source.uri"
    )
    assert "scheme" in _spec_error(resolver.read, "ftp://host/x.onnx", "0" * 64, field="spec.source").message
    small = SourceResolver(max_bytes=100)
    big = _spec_error(small.read, source_file.uri, source_file.sha256, field="spec.source")
    assert big.field == "spec.source.uri"
    assert "over the limit of 100" in big.message


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    error = _spec_error(SourceResolver().read, fifo.as_uri(), "0" * 64, field="spec.source")
    assert (error.field, error.message) == ("spec.source.uri", f"{fifo} is not a regular file")


def test_unknown_store_options_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown store options"):
        SourceResolver(store_options={"endpoint": "localhost:9000", "bucket": "x"})
    with pytest.raises(ValueError, match="secure"):
        SourceResolver(store_options={"secure": "maybe"})


# -- models -----------------------------------------------------------------------------------------


def test_load_model_checks_and_records_the_digest(resolver: SourceResolver, source_file: StagedFile) -> None:
    loaded = resolver.load_model(ModelSource(uri=source_file.uri, sha256=source_file.sha256))
    assert loaded.digest == source_file.sha256
    assert loaded.path == source_file.path
    assert [n.name for n in loaded.model.graph.input] == ["input"]


def test_the_resolver_loads_as_the_cli_does(resolver: SourceResolver, source_file: StagedFile, tmp_path: Path) -> None:
    # Same checks and normalisation as `edgefleet optimize MODEL`: the same variant ids follow.
    old = stage(tmp_path / "old.onnx", model_bytes(tiny_cnn(opset=13)))
    for staged in (source_file, old):
        via_cli = load_model(staged.path)
        via_resolver = resolver.load_model(ModelSource(uri=staged.uri, sha256=staged.sha256))
        assert (via_resolver.content_digest, via_resolver.notes) == (via_cli.content_digest, via_cli.notes)


def test_load_model_upgrades_old_opsets(tmp_path: Path) -> None:
    old = stage(tmp_path / "old.onnx", model_bytes(tiny_cnn(opset=13)))
    loaded = SourceResolver().load_model(ModelSource(uri=old.uri, sha256=old.sha256))
    assert loaded.notes == ["upgraded opset 13 to 17"]


def test_a_file_that_is_not_onnx_names_the_source(tmp_path: Path) -> None:
    junk = stage(tmp_path / "junk.onnx", b"not a model at all")
    error = _spec_error(SourceResolver().load_model, ModelSource(uri=junk.uri, sha256=junk.sha256))
    assert error.field == "spec.source.uri"
    assert error.message.startswith("not a usable ONNX model: not an ONNX model")


# -- evaluation data ----------------------------------------------------------------------------------


def _budget(data: StagedFile, samples: int | None = None) -> AccuracyBudget:
    body: dict[str, object] = {"uri": data.uri, "sha256": data.sha256}
    if samples is not None:
        body["samples"] = samples
    return AccuracyBudget.model_validate({"evaluationData": body})


def _loaded(resolver: SourceResolver, source: StagedFile) -> LoadedModel:
    return resolver.load_model(ModelSource(uri=source.uri, sha256=source.sha256))


def test_no_evaluation_data(resolver: SourceResolver, source_file: StagedFile) -> None:
    model = _loaded(resolver, source_file)
    assert resolver.load_evaluation_data(None, model) is None
    assert resolver.load_evaluation_data(AccuracyBudget(max_drop=0.02), model) is None


def test_evaluation_data_loads_with_its_digest(
    resolver: SourceResolver, source_file: StagedFile, eval_data: StagedFile
) -> None:
    loaded = resolver.load_evaluation_data(_budget(eval_data), _loaded(resolver, source_file))
    assert loaded is not None
    dataset, digest = loaded
    assert (len(dataset), digest) == (40, eval_data.sha256)
    assert dataset.labels is not None


def test_samples_take_a_prefix_and_change_the_digest(
    resolver: SourceResolver, source_file: StagedFile, eval_data: StagedFile
) -> None:
    model = _loaded(resolver, source_file)
    loaded = resolver.load_evaluation_data(_budget(eval_data, samples=12), model)
    assert loaded is not None
    dataset, digest = loaded
    assert len(dataset) == 12
    thirteen = resolver.load_evaluation_data(_budget(eval_data, samples=13), model)
    again = resolver.load_evaluation_data(_budget(eval_data, samples=12), model)
    assert thirteen is not None
    assert again is not None
    assert digest not in (eval_data.sha256, thirteen[1])
    assert again[1] == digest


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (_npz(input=np.zeros((4, 1, 9, 9), np.float32)), "does not fit the model: input 'input' has size 9 on axis 2"),
        (_npz(other=tiny_inputs(4)), "does not fit the model: no array for model input 'input'"),
        (b"PK\x03\x04 truncated zip", "is not a readable .npz file"),
        (b"\x93NUMPY garbage", "is not a readable .npz file"),
    ],
)
def test_evaluation_data_that_does_not_fit(
    resolver: SourceResolver, source_file: StagedFile, tmp_path: Path, content: bytes, expected: str
) -> None:
    bad = stage(tmp_path / "bad.npz", content)
    error = _spec_error(resolver.load_evaluation_data, _budget(bad), _loaded(resolver, source_file))
    assert error.field == "spec.accuracy.evaluationData"
    assert expected in error.message


def test_a_single_array_is_not_an_npz(resolver: SourceResolver, source_file: StagedFile, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    np.save(buffer, tiny_inputs(4))
    bad = stage(tmp_path / "single.npz", buffer.getvalue())
    error = _spec_error(resolver.load_evaluation_data, _budget(bad), _loaded(resolver, source_file))
    assert "single array" in error.message


def test_evaluation_data_digest_mismatch_names_its_field(
    resolver: SourceResolver, source_file: StagedFile, eval_data: StagedFile
) -> None:
    wrong = StagedFile(eval_data.path, eval_data.uri, "f" * 64)
    error = _spec_error(resolver.load_evaluation_data, _budget(wrong), _loaded(resolver, source_file))
    assert error.field == "spec.accuracy.evaluationData.sha256"


# -- s3:// ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://models", "names a bucket but no object"),
        ("s3://models/", "names a bucket but no object"),
        ("s3://Bad_Bucket/model.onnx", "not a valid bucket name"),
        ("s3://models/a/../b.onnx", "bad key prefix"),
        ("s3://models/model.onnx?versionId=3", "takes no query"),
    ],
)
def test_s3_uris_are_checked_before_any_connection(uri: str, expected: str) -> None:
    resolver = SourceResolver(store_options={"endpoint": "http://127.0.0.1:9"})
    error = _spec_error(resolver.read, uri, "0" * 64, field="spec.source")
    assert error.field == "spec.source.uri"
    assert expected in error.message


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_an_unreachable_store_is_transient() -> None:
    resolver = SourceResolver(
        store_options={"endpoint": f"http://127.0.0.1:{_closed_port()}", "access_key": "k", "secret_key": "s"},
        s3_retry=NO_RETRY,
    )
    with pytest.raises(TransientError, match="cannot reach the store"):
        resolver.read("s3://models/model.onnx", "0" * 64, field="spec.source")


@pytest.mark.integration
def test_s3_sources_through_a_real_s3_api(s3_server: S3Server, source_file: StagedFile) -> None:
    client = Minio(s3_server.endpoint, access_key=s3_server.access_key, secret_key=s3_server.secret_key, secure=False)
    bucket = f"reconcile-{hashlib.sha256(source_file.uri.encode()).hexdigest()[:12]}"
    client.make_bucket(bucket)
    data = source_file.path.read_bytes()
    client.put_object(bucket, "digits/1/model.onnx", io.BytesIO(data), len(data))
    resolver = SourceResolver(
        store_options={
            "endpoint": s3_server.url,
            "access_key": s3_server.access_key,
            "secret_key": s3_server.secret_key,
            "region": s3_server.region,
        },
        s3_retry=NO_RETRY,
    )
    loaded = resolver.load_model(ModelSource(uri=f"s3://{bucket}/digits/1/model.onnx", sha256=source_file.sha256))
    assert loaded.digest == source_file.sha256
    missing = _spec_error(resolver.read, f"s3://{bucket}/digits/2/model.onnx", "0" * 64, field="spec.source")
    assert missing.field == "spec.source.uri"
    assert "no object" in missing.message
    no_bucket = _spec_error(resolver.read, "s3://no-such-bucket-here/model.onnx", "0" * 64, field="spec.source")
    assert "does not exist" in no_bucket.message


# -- http(s):// ----------------------------------------------------------------------------------------


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server over a folder; ``/fail`` answers 503."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            if self.path == "/fail":
                self.send_error(503, "try later")
                return
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            del format, args

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.integration
def test_http_sources(http_root: tuple[str, Path], source_file: StagedFile) -> None:
    base, root = http_root
    (root / "model.onnx").write_bytes(source_file.path.read_bytes())
    resolver = SourceResolver()
    assert resolver.read(f"{base}/model.onnx", source_file.sha256, field="spec.source") == (
        source_file.path.read_bytes()
    )
    missing = _spec_error(resolver.read, f"{base}/gone.onnx", "0" * 64, field="spec.source")
    assert (missing.field, "HTTP 404" in missing.message) == ("spec.source.uri", True)
    with pytest.raises(TransientError, match="HTTP 503"):
        resolver.read(f"{base}/fail", "0" * 64, field="spec.source")
    small = SourceResolver(max_bytes=100)
    assert "over the limit" in _spec_error(small.read, f"{base}/model.onnx", source_file.sha256, field="s").message
    with pytest.raises(TransientError, match="cannot reach"):
        resolver.read(f"http://127.0.0.1:{_closed_port()}/model.onnx", "0" * 64, field="spec.source")
