"""Model files are untrusted: every bad one is refused with the problem named, and outputs are atomic."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper, helper, numpy_helper

from edgefleet_core.errors import ModelError
from edgefleet_core.optimize.model_io import (
    TARGET_OPSET,
    default_opset,
    load_model,
    serialize,
    write_dir_atomic,
    write_file_atomic,
)
from tests.support.tiny_models import tiny_cnn


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(serialize(model))
    return path


def test_loads_a_valid_model_and_digests_the_file(tmp_path: Path) -> None:
    path = _save(tiny_cnn(), tmp_path / "m.onnx")
    loaded = load_model(path)
    assert len(loaded.digest) == 64
    assert loaded.notes == []
    assert default_opset(loaded.model) == TARGET_OPSET


def test_old_opset_is_upgraded_with_a_note(tmp_path: Path) -> None:
    loaded = load_model(_save(tiny_cnn(opset=11), tmp_path / "old.onnx"))
    assert default_opset(loaded.model) == TARGET_OPSET
    assert loaded.notes == [f"upgraded opset 11 to {TARGET_OPSET}"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "file is empty"),
        (b"definitely not a protobuf \x00\xff\xfe", "not an ONNX model"),
        (b"\x08\x07", "not an ONNX model (no graph"),
    ],
)
def test_refuses_files_that_are_not_models(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError) as caught:
        load_model(path)
    assert fragment in caught.value.problem
    assert caught.value.source == str(path)


def test_refuses_a_truncated_model(tmp_path: Path) -> None:
    data = serialize(tiny_cnn())
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"not an ONNX model|invalid ONNX model"):
        load_model(path)


def test_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such file"):
        load_model(tmp_path / "nope.onnx")


def test_refuses_an_opset_older_than_nine(tmp_path: Path) -> None:
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        ),
        opset_imports=[helper.make_opsetid("", 7)],
    )
    model.ir_version = 3
    with pytest.raises(ModelError, match="opset 7 is older"):
        load_model(_save(model, tmp_path / "ancient.onnx"))


def _with_external(tmp_path: Path, location: str, *, offset: int = 0, length: int | None = None) -> Path:
    """A model whose conv weight lives in external data at ``location``."""
    model = tiny_cnn()
    weight = next(i for i in model.graph.initializer if i.name == "conv_w")
    raw = numpy_helper.to_array(weight).tobytes()
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset), "length": str(length if length is not None else len(raw))}
    for key, value in entries.items():
        weight.external_data.add(key=key, value=value)
    (tmp_path / "model_dir").mkdir(exist_ok=True)
    path = tmp_path / "model_dir" / "m.onnx"
    path.write_bytes(model.SerializeToString())
    target = (path.parent / location) if not Path(location).is_absolute() else Path(location)
    if ".." not in Path(location).parts and not Path(location).is_absolute():
        target.write_bytes(raw)
    return path


def test_external_data_inside_the_folder_loads(tmp_path: Path) -> None:
    loaded = load_model(_with_external(tmp_path, "weights.bin"))
    weight = next(i for i in loaded.model.graph.initializer if i.name == "conv_w")
    assert not external_data_helper.uses_external_data(weight)
    assert numpy_helper.to_array(weight).shape == (8, 1, 3, 3)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "a/../../secret.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path: Path, location: str) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 4096)
    with pytest.raises(ModelError, match="points outside the model's folder"):
        load_model(_with_external(tmp_path, location))


def test_external_data_through_a_symlink_is_refused(tmp_path: Path) -> None:
    path = _with_external(tmp_path, "weights.bin")
    (path.parent / "weights.bin").rename(tmp_path / "elsewhere.bin")
    os.symlink(tmp_path / "elsewhere.bin", path.parent / "weights.bin")
    with pytest.raises(ModelError, match="symbolic link"):
        load_model(path)


def test_external_data_through_a_hard_link_is_refused(tmp_path: Path) -> None:
    path = _with_external(tmp_path, "weights.bin")
    os.link(path.parent / "weights.bin", tmp_path / "other-name.bin")
    with pytest.raises(ModelError, match="hard link"):
        load_model(path)


def test_external_data_range_beyond_the_file_is_refused(tmp_path: Path) -> None:
    path = _with_external(tmp_path, "weights.bin", offset=16, length=10**9)
    with pytest.raises(ModelError, match="beyond its file"):
        load_model(path)


@pytest.mark.parametrize(
    ("offset", "length", "fragment"),
    [
        ("abc", "288", "offset 'abc', not a non-negative integer"),
        ("0", "1e9", "length '1e9', not a non-negative integer"),
        ("-4", "288", "offset '-4', not a non-negative integer"),
    ],
)
def test_external_data_offsets_that_are_not_numbers_are_refused(
    tmp_path: Path, offset: str, length: str, fragment: str
) -> None:
    path = _with_external(tmp_path, "weights.bin")
    model = onnx.load_model_from_string(path.read_bytes())
    weight = next(i for i in model.graph.initializer if i.name == "conv_w")
    del weight.external_data[:]
    for key, value in (("location", "weights.bin"), ("offset", offset), ("length", length)):
        weight.external_data.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match=fragment):
        load_model(path)


def _relocate(path: Path, location: str) -> Path:
    """The model at ``path`` with its conv weight's external data location changed to ``location``."""
    model = onnx.load_model_from_string(path.read_bytes())
    weight = next(i for i in model.graph.initializer if i.name == "conv_w")
    next(e for e in weight.external_data if e.key == "location").value = location
    path.write_bytes(model.SerializeToString())
    return path


def test_external_data_location_with_a_nul_byte_is_refused(tmp_path: Path) -> None:
    path = _relocate(_with_external(tmp_path, "weights.bin"), "weights.bin\x00.txt")
    with pytest.raises(ModelError, match="points outside the model's folder"):
        load_model(path)  # Path("a\x00b").stat() would raise ValueError: never reached


def test_external_data_through_a_symlinked_folder_is_refused_even_inside(tmp_path: Path) -> None:
    path = _with_external(tmp_path, "weights.bin")
    (path.parent / "real").mkdir()
    (path.parent / "weights.bin").rename(path.parent / "real" / "weights.bin")
    os.symlink("real", path.parent / "sub")
    _relocate(path, "sub/weights.bin")
    with pytest.raises(ModelError, match="symbolic link"):
        load_model(path)


def test_external_data_that_is_a_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    path = _with_external(tmp_path, "weights.bin")
    (path.parent / "weights.bin").unlink()
    os.mkfifo(path.parent / "weights.bin")
    with pytest.raises(ModelError, match="not a regular file"):
        load_model(path)  # opening the FIFO would block here


def test_a_model_file_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="not a regular file"):
        load_model(tmp_path / "m.onnx")


def test_tensor_dims_beyond_its_data_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    model = tiny_cnn()
    weight = next(i for i in model.graph.initializer if i.name == "conv_w")
    del weight.dims[:]
    weight.dims.extend([2**40])
    with pytest.raises(ModelError, match=r"tensor 'conv_w' has dims \[1099511627776\] \(4398046511104 bytes\)"):
        load_model(_save(model, tmp_path / "liar.onnx"))


def test_a_sparse_initializer_too_large_once_dense_is_refused(tmp_path: Path) -> None:
    model = tiny_cnn()
    values = numpy_helper.from_array(np.ones(1, np.float32), "sparse_w")
    indices = numpy_helper.from_array(np.zeros(1, np.int64), "sparse_w_indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [2**40]))
    with pytest.raises(ModelError, match="sparse tensor 'sparse_w' has dense dims"):
        load_model(_save(model, tmp_path / "sparse.onnx"))


def test_write_file_atomic_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    write_file_atomic(target, b"one")
    write_file_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_write_dir_atomic_publishes_all_or_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_dir_atomic(out, {"a.txt": b"1", "b.txt": b"2"})
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"]
    with pytest.raises(ValueError, match="must not contain a folder"):
        write_dir_atomic(out, {"c.txt": b"3", "../escape.txt": b"4"})
    # The failed write left the old folder as it was and no staging folder behind.
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    write_dir_atomic(out, {"c.txt": b"3"})
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"]
    assert not (tmp_path / "escape.txt").exists()
    assert np.array_equal(np.frombuffer((out / "c.txt").read_bytes(), np.uint8), np.frombuffer(b"3", np.uint8))


def test_an_ir_version_newer_than_onnx_runtime_reads_is_lowered_when_safe(tmp_path: Path) -> None:
    model = tiny_cnn()
    model.ir_version = 14
    loaded = load_model(_save(model, tmp_path / "new-ir.onnx"))
    assert loaded.model.ir_version <= 13
    assert any("lowered IR version 14" in note for note in loaded.notes)
    import onnxruntime as ort

    ort.InferenceSession(serialize(loaded.model), providers=["CPUExecutionProvider"])


def test_outputs_are_readable_by_others_and_secrets_are_not(tmp_path: Path) -> None:
    import stat

    from edgefleet_core.atomic import PRIVATE

    write_file_atomic(tmp_path / "model.onnx", b"model")
    write_file_atomic(tmp_path / "key.pem", b"secret", mode=PRIVATE)
    write_dir_atomic(tmp_path / "out", {"report.json": b"{}"})
    assert stat.S_IMODE((tmp_path / "model.onnx").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "out" / "report.json").stat().st_mode) == 0o644
