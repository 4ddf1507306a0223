"""Hostile ONNX models are refused before any allocation: external-data tricks and lying dims.

Every case is a model folder built here; each is loaded with :func:`load_model` in one child
process whose address space is capped (``RLIMIT_AS``) at what it had after its imports plus
:data:`HEADROOM`. Each hostile model's dims ask for far more than that (terabytes), so a loader
that allocated what a tensor's dims say would fail with ``MemoryError`` (or be killed) instead of
refusing with a :class:`ModelError` that names the tensor and the problem, and the test fails.
A FIFO as external data must not block the loader either: the child runs under a timeout.

What is accepted on purpose: huge dims in graph input shapes (they are only declarations, and
usually symbolic), and ops such as ``ConstantOfShape`` whose output size is only known when the
model runs: that is the runtime's business (ONNX Runtime fails the run), not the loader's.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from edgefleet_core.cli.main import build_app
from edgefleet_core.optimize.model_io import serialize
from tests.support.reliability import record_matrix
from tests.support.tiny_models import tiny_cnn

pytestmark = pytest.mark.reliability

HEADROOM = 512 * 1024**2
"""Address space the child may add after its imports: a loader allocating from hostile dims cannot fit."""
WEIGHT = "conv_w"
WEIGHT_BYTES = 8 * 1 * 3 * 3 * 4
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "valid"

CHILD = """
import json, resource, sys
from pathlib import Path
from edgefleet_core.errors import ModelError
from edgefleet_core.optimize.model_io import load_model

def address_space():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")

limit = address_space() + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
results = {}
for path in sys.argv[2:]:
    try:
        load_model(Path(path))
        results[path] = ["OK", ""]
    except ModelError as exc:
        results[path] = ["ModelError", exc.problem]
    except BaseException as exc:  # the verdict: anything but a ModelError is a failure
        results[path] = [type(exc).__name__, str(exc)[:300]]
print(json.dumps(results))
"""

Builder = Callable[[Path], Path]


def _folder(tmp: Path, name: str) -> Path:
    folder = tmp / name
    folder.mkdir()
    return folder


def _save(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "model.onnx"
    path.write_bytes(serialize(model))
    return path


def _weight_bytes() -> bytes:
    weight = next(i for i in tiny_cnn().graph.initializer if i.name == WEIGHT)
    return numpy_helper.to_array(weight).tobytes()


def _external(
    location: str,
    *,
    offset: str | None = "0",
    length: str | None = str(WEIGHT_BYTES),
    dims: list[int] | None = None,
    prepare: Callable[[Path], None] | None = None,
) -> Builder:
    """A tiny CNN whose conv weight lives in external data with these entries; ``prepare`` lays out the folder."""

    def build(folder: Path) -> Path:
        model = tiny_cnn()
        weight = next(i for i in model.graph.initializer if i.name == WEIGHT)
        weight.ClearField("raw_data")
        weight.ClearField("float_data")
        if dims is not None:
            del weight.dims[:]
            weight.dims.extend(dims)
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", length)):
            if value is not None:
                weight.external_data.add(key=key, value=value)
        if prepare is None:
            (folder / "weights.bin").write_bytes(_weight_bytes())
        else:
            prepare(folder)
        return _save(model, folder)

    return build


def _weights_elsewhere(folder: Path) -> Path:
    outside = folder.parent / f"{folder.name}-outside"
    outside.mkdir()
    (outside / "weights.bin").write_bytes(_weight_bytes())
    return outside


def _symlinked_file(folder: Path) -> None:
    os.symlink(_weights_elsewhere(folder) / "weights.bin", folder / "weights.bin")


def _symlink_inside(folder: Path) -> None:
    (folder / "real.bin").write_bytes(_weight_bytes())
    os.symlink("real.bin", folder / "weights.bin")


def _symlinked_folder(folder: Path) -> None:
    os.symlink(_weights_elsewhere(folder), folder / "sub")


def _symlinked_folder_inside(folder: Path) -> None:
    (folder / "real").mkdir()
    (folder / "real" / "weights.bin").write_bytes(_weight_bytes())
    os.symlink("real", folder / "sub")


def _hard_link(folder: Path) -> None:
    (folder / "weights.bin").write_bytes(_weight_bytes())
    os.link(folder / "weights.bin", folder.parent / f"{folder.name}-second-name.bin")


def _directory(folder: Path) -> None:
    (folder / "weights.bin").mkdir()


def _fifo(folder: Path) -> None:
    os.mkfifo(folder / "weights.bin")


def _device(folder: Path) -> None:
    os.mknod(folder / "weights.bin", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers


def _secret(folder: Path) -> None:
    (folder.parent / "secret.bin").write_bytes(_weight_bytes())


def _lying(dims: list[int], *, raw: bytes | None = None, floats: int | None = None) -> Builder:
    """A tiny CNN whose conv weight claims ``dims`` while holding ``raw`` bytes or ``floats`` values (or nothing)."""

    def build(folder: Path) -> Path:
        model = tiny_cnn()
        weight = next(i for i in model.graph.initializer if i.name == WEIGHT)
        weight.ClearField("raw_data")
        del weight.dims[:]
        weight.dims.extend(dims)
        if raw is not None:
            weight.raw_data = raw
        if floats is not None:
            weight.float_data.extend([0.5] * floats)
        return _save(model, folder)

    return build


def _huge_constant(folder: Path) -> Path:
    model = tiny_cnn()
    value = TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[2**40], raw_data=b"\x00" * 4)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["unused"], name="lying_constant", value=value))
    return _save(model, folder)


def _huge_sparse(folder: Path) -> Path:
    model = tiny_cnn()
    values = numpy_helper.from_array(np.ones(1, np.float32), "sparse_w")
    indices = numpy_helper.from_array(np.zeros(1, np.int64), "sparse_w_indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [2**40]))
    return _save(model, folder)


def _huge_input_shape(folder: Path) -> Path:
    model = tiny_cnn()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2**40
    return _save(model, folder)


def _constant_of_shape(folder: Path) -> Path:
    model = tiny_cnn()
    shape = numpy_helper.from_array(np.array([2**20, 2**20, 2**10], np.int64), "big_shape")
    model.graph.initializer.append(shape)
    model.graph.node.append(helper.make_node("ConstantOfShape", ["big_shape"], ["big"]))
    model.graph.output.append(helper.make_tensor_value_info("big", TensorProto.FLOAT, [2**20, 2**20, 2**10]))
    return _save(model, folder)


REFUSED: dict[str, tuple[Builder, str]] = {
    # external data: where it is
    "dotdot": (_external("../secret.bin", prepare=_secret), "points outside the model's folder"),
    "dotdot-inside-path": (_external("sub/../../secret.bin", prepare=_secret), "points outside the model's folder"),
    "absolute": (_external("/etc/hostname"), "points outside the model's folder"),
    "empty-location": (_external(""), "points outside the model's folder"),
    "nul-in-location": (_external("weights.bin\x00.txt"), "points outside the model's folder"),
    "symlinked-file": (_external("weights.bin", prepare=_symlinked_file), "symbolic link"),
    "symlink-within-folder": (_external("weights.bin", prepare=_symlink_inside), "symbolic link"),
    "symlinked-folder": (_external("sub/weights.bin", prepare=_symlinked_folder), "symbolic link"),
    "symlinked-folder-within": (_external("sub/weights.bin", prepare=_symlinked_folder_inside), "symbolic link"),
    "hard-link": (_external("weights.bin", prepare=_hard_link), "hard link"),
    "directory": (_external("weights.bin", prepare=_directory), "not a regular file"),
    "fifo": (_external("weights.bin", prepare=_fifo), "not a regular file"),
    "missing": (_external("weights.bin", prepare=lambda folder: None), "is missing"),
    # external data: how much of it
    "offset-beyond-file": (_external("weights.bin", offset=str(WEIGHT_BYTES + 1), length="4"), "beyond its file"),
    "length-beyond-file": (_external("weights.bin", length=str(2**62)), "beyond its file"),
    "negative-offset": (_external("weights.bin", offset="-4"), "offset '-4', not a non-negative integer"),
    "non-numeric-offset": (_external("weights.bin", offset="abc"), "offset 'abc', not a non-negative integer"),
    "non-numeric-length": (_external("weights.bin", length="1e9"), "length '1e9', not a non-negative integer"),
    "hex-length": (_external("weights.bin", length="0x120"), "length '0x120', not a non-negative integer"),
    "huge-dims-external": (_external("weights.bin", dims=[2**40]), "dims [1099511627776]"),
    "huge-dims-external-no-length": (
        _external("weights.bin", length=None, dims=[2**31, 2**31]),
        "but 288 bytes of data",
    ),
    "short-length-for-dims": (_external("weights.bin", length="16"), "but 16 bytes of data"),
    # lying dims in the model itself
    "huge-dims-raw": (_lying([2**40], raw=b"\x00" * 4), "dims [1099511627776] (4398046511104 bytes) but 4 bytes"),
    "huge-dims-2d": (_lying([2**31, 2**31], raw=b"\x00" * 4), "but 4 bytes of data"),
    "huge-rank": (_lying([2**20] * 64, raw=b"\x00" * 4), "over 2**64 elements"),
    "negative-dims": (_lying([-1, 72], raw=b"\x00" * WEIGHT_BYTES), "negative dimension"),
    "raw-size-mismatch": (_lying([8, 1, 3, 3], raw=b"\x00" * 100), "but 100 bytes of data"),
    "huge-dims-typed": (_lying([2**40], floats=72), "but 72 values in float_data"),
    "huge-dims-no-data": (_lying([2**35]), "but 0 values in float_data"),
    "huge-constant-attribute": (_huge_constant, "'value' of node 'lying_constant'"),
    "huge-sparse-dense-dims": (_huge_sparse, "dense dims [1099511627776]"),
}
"""Case → (model builder, what the refusal must say). Tensor-level refusals also name the tensor."""
NAMES_THE_WEIGHT = {name for name in REFUSED if name not in ("huge-constant-attribute", "huge-sparse-dense-dims")}


def _subfolder_weights(folder: Path) -> None:
    (folder / "sub").mkdir()
    (folder / "sub" / "weights.bin").write_bytes(_weight_bytes())


ACCEPTED: dict[str, Builder] = {
    "external-data-in-subfolder": _external("sub/weights.bin", prepare=_subfolder_weights),
    "external-data-inside-folder": _external("weights.bin"),
    "huge-input-shape (a declaration)": _huge_input_shape,
    "constant-of-shape (runtime's business)": _constant_of_shape,
}


def _cases(tmp_path: Path, table: dict[str, Builder]) -> dict[str, Path]:
    return {name: build(_folder(tmp_path, name.split(" ")[0])) for name, build in table.items()}


def _load_all_capped(paths: list[Path]) -> dict[str, list[str]]:
    """``load_model`` on each path in one child process with a capped address space; ``{path: [kind, problem]}``."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(HEADROOM), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,  # a loader blocked on a FIFO fails here instead of hanging the suite
        check=False,
    )
    assert done.returncode == 0, f"the loader child died ({done.returncode}): {done.stderr[-2000:]}"
    results: dict[str, list[str]] = json.loads(done.stdout)
    return results


def test_hostile_models_are_refused_before_any_allocation(tmp_path: Path) -> None:
    refused = {name: build for name, (build, _) in REFUSED.items()}
    if os.geteuid() == 0:  # creating a device node takes root
        refused["character-device"] = _external("weights.bin", prepare=_device)
    cases = _cases(tmp_path, refused)
    accepted = _cases(tmp_path, ACCEPTED)
    results = _load_all_capped([*cases.values(), *accepted.values()])
    wrong = {}
    for name, path in cases.items():
        kind, problem = results[str(path)]
        fragment = REFUSED[name][1] if name in REFUSED else "not a regular file"
        named = WEIGHT in problem if name in NAMES_THE_WEIGHT else True
        if kind != "ModelError" or fragment not in problem or not named:
            wrong[name] = (kind, problem)
    for name, path in accepted.items():
        if results[str(path)][0] != "OK":
            wrong[name] = (results[str(path)][0], results[str(path)][1])
    assert not wrong, json.dumps(wrong, indent=1)
    cells = {name: {"answer": results[str(path)][0], "refusal names": REFUSED[name][1] if name in REFUSED
                    else "not a regular file"} for name, path in cases.items()}  # fmt: skip
    cells.update({name: {"answer": "OK (accepted)", "refusal names": "—"} for name in accepted})
    record_matrix(f"hostile ONNX models: load_model under a {HEADROOM >> 20} MiB address-space cap", cells)


def test_the_cap_would_catch_a_loader_that_allocates_from_dims(tmp_path: Path) -> None:
    """The harness itself: under the same cap, allocating what a lying tensor's dims say fails."""
    script = CHILD.replace("load_model(Path(path))", "__import__('numpy').zeros(2**40, 'float32')")
    done = subprocess.run(
        [sys.executable, "-c", script, str(HEADROOM), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(done.stdout)[str(tmp_path)][0] == "MemoryError"


CPU_CLASS = str(EXAMPLES / "deviceclass-x86-cpu.yaml")
ACCELERATED_CLASS = str(EXAMPLES / "deviceclass-jetson-gpu.yaml")  # partition plan needs an accelerator link


@pytest.mark.parametrize(
    ("case", "command", "options"),
    [
        ("huge-dims-raw", ["optimize"], ["--device-class", CPU_CLASS, "--out", "OUT"]),
        ("non-numeric-offset", ["partition", "plan"], ["--device-class", ACCELERATED_CLASS]),
        ("dotdot", ["partition", "plan"], ["--device-class", ACCELERATED_CLASS]),
    ],
)
def test_the_cli_refuses_hostile_models_with_a_message_and_no_traceback(
    tmp_path: Path, case: str, command: list[str], options: list[str]
) -> None:
    build, fragment = REFUSED[case]
    path = build(_folder(tmp_path, case))
    options = [str(tmp_path / "out") if option == "OUT" else option for option in options]
    result = CliRunner().invoke(build_app(), [*command, str(path), *options], env={"COLUMNS": "250"})
    output = result.stdout + result.stderr
    assert result.exit_code not in (0, None), output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    assert fragment in " ".join(output.split()), output
