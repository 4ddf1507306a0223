"""Regenerate (or check) the committed Python stubs of the wire contract.

The ``.proto`` files under ``proto/edgefleet/v1/`` are the one source of truth; the stubs under
``proto/edgefleet_proto/v1/`` are generated from them and committed so that installs need no
protoc. This script runs ``python -m grpc_tools.protoc`` (with the interpreter running it) and
mypy-protobuf's plugins into a temporary directory, rewrites the generated absolute imports from
the proto package path (``edgefleet.v1``) to the import package (``edgefleet_proto.v1``), and
then either writes the result into place or, with ``--check``, compares it byte for byte with
the committed files (exit status 1, listing changed, missing and extra files).

    python scripts/gen_proto.py            # regenerate
    python scripts/gen_proto.py --check    # fail if the committed stubs are stale

Apart from that rewrite the files are exactly what the tools emit, so the output depends only on
the ``.proto`` files and the tool versions. Those are pinned in pyproject's ``dev`` extra
(``grpcio-tools``, ``mypy-protobuf``); a different version of either produces different bytes.

Runtime pins must follow the tools: the generated ``*_pb2.py`` refuses to import under a
protobuf runtime older than the protoc that generated it (and warns under a newer major), and the
generated ``*_pb2_grpc.py`` refuses to import under a grpcio older than grpcio-tools. So when
``grpcio-tools`` is bumped, pyproject's ``grpcio>=`` must become the grpcio-tools version and
``protobuf>=`` the "Protobuf Python Version" in the ``*_pb2.py`` headers (with ``<`` the next
major). With grpcio-tools 1.85.1 (libprotoc 35.1) that is ``grpcio>=1.85.1`` and
``protobuf>=7.35.1,<8``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
# Sorted, relative to PROTO_ROOT, as protoc names them in the generated code.
PROTO_FILES = ("edgefleet/v1/fleet.proto", "edgefleet/v1/inference.proto")
# Where protoc writes, following the proto package; and where the stubs are committed.
GENERATED_SUBDIR = Path("edgefleet/v1")
OUTPUT_DIR = PROTO_ROOT / "edgefleet_proto" / "v1"
# Files in OUTPUT_DIR that are written by hand; everything else there is generated.
HAND_WRITTEN = frozenset({"__init__.py"})

PROTOC_TIMEOUT_S = 120

# `from edgefleet.v1 import fleet_pb2 as ...` (protoc's python and grpc plugins, mypy-protobuf).
_FROM_IMPORT = re.compile(r"^(\s*from )edgefleet\.v1( import )", re.MULTILINE)
# `import edgefleet.v1.fleet_pb2`, its dotted uses, and the module name protobuf gives the
# generated classes (`'edgefleet.v1.fleet_pb2'`, their `__module__`; pickling needs it right).
# Not the `/edgefleet.v1.Service/Method` paths or `.edgefleet.v1.Message` type names: those are
# wire names and must stay.
_MODULE_PATH = re.compile(r"(?<![\w./])edgefleet\.v1\.(?=\w+_pb2(?:_grpc)?\b)")
_LEFTOVER_IMPORT = re.compile(r"^\s*(?:from|import)\s+edgefleet\.v1\b", re.MULTILINE)


class GenerationError(Exception):
    """protoc or a plugin failed, or produced code this script does not know how to rewrite."""


def _plugin(name: str) -> Path:
    # Console scripts live next to the interpreter of the environment that installed them.
    path = Path(sys.executable).parent / name
    if not os.access(path, os.X_OK):
        raise GenerationError(f"{path} not found: install the dev extra (mypy-protobuf)")
    return path


def rewrite_imports(source: str) -> str:
    """Point the generated code's imports at the import package ``edgefleet_proto.v1``."""
    rewritten = _FROM_IMPORT.sub(r"\1edgefleet_proto.v1\2", source)
    rewritten = _MODULE_PATH.sub("edgefleet_proto.v1.", rewritten)
    leftover = _LEFTOVER_IMPORT.search(rewritten)
    if leftover is not None:
        found = leftover.group(0).strip()
        raise GenerationError(f"unrewritten import in generated code: {found!r}")
    return rewritten


def generate() -> dict[str, bytes]:
    """Run protoc and the plugins; return the rewritten files by name, sorted."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-proto-") as tmp:
        out = Path(tmp)
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *PROTO_FILES,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=PROTOC_TIMEOUT_S, check=False)
        if result.returncode != 0:
            raise GenerationError(f"protoc failed ({result.returncode}):\n{result.stderr}")
        produced = out / GENERATED_SUBDIR
        files: dict[str, bytes] = {}
        for path in sorted(produced.iterdir()):
            if not path.is_file():
                raise GenerationError(f"unexpected output {path.name!r} from protoc")
            text = path.read_bytes().decode("utf-8")
            files[path.name] = rewrite_imports(text).encode("utf-8")
    unexpected = set(files) & HAND_WRITTEN
    if unexpected or not files:
        raise GenerationError(f"protoc produced {sorted(files)}; expected stubs only")
    return files


def committed_files(output_dir: Path) -> dict[str, bytes]:
    """The files in ``output_dir`` other than the hand-written ones (subdirectories such as
    ``__pycache__`` are not stubs and are ignored)."""
    if not output_dir.is_dir():
        return {}
    return {
        path.name: path.read_bytes()
        for path in sorted(output_dir.iterdir())
        if path.is_file() and path.name not in HAND_WRITTEN
    }


def compare(expected: Mapping[str, bytes], actual: Mapping[str, bytes]) -> list[str]:
    """Differences as ``changed|missing|extra: NAME`` lines, sorted by name; empty if identical."""
    problems: list[str] = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            problems.append(f"missing: {name}")
        elif name not in expected:
            problems.append(f"extra: {name}")
        elif expected[name] != actual[name]:
            problems.append(f"changed: {name}")
    return problems


def check(output_dir: Path = OUTPUT_DIR) -> list[str]:
    """Regenerate into a temporary directory and compare with ``output_dir``."""
    return compare(generate(), committed_files(output_dir))


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would be committed as is
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write(output_dir: Path = OUTPUT_DIR) -> list[str]:
    """Regenerate into ``output_dir``: rewrite changed files, remove stale ones.

    Returns the changes made, in the format of :func:`compare`.
    """
    files = generate()
    output_dir.mkdir(parents=True, exist_ok=True)
    changes = compare(files, committed_files(output_dir))
    for problem in changes:
        kind, name = problem.split(": ", 1)
        target = output_dir / name
        if kind == "extra":
            target.unlink()
        else:
            _write_atomically(target, files[name])
    return changes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare freshly generated stubs with the committed ones; exit 1 if they differ",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=OUTPUT_DIR,
        help="directory of the committed stubs (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    output_dir: Path = args.output_dir
    try:
        if args.check:
            problems = check(output_dir)
            for problem in problems:
                print(problem, file=sys.stderr)
            if problems:
                hint = "run `python scripts/gen_proto.py` and commit the result"
                print(f"{output_dir} is stale: {hint}", file=sys.stderr)
                return 1
            print(f"{output_dir}: up to date")
            return 0
        changes = write(output_dir)
    except (GenerationError, subprocess.TimeoutExpired) as exc:
        print(f"gen_proto: {exc}", file=sys.stderr)
        return 2
    for change in changes:
        kind, name = change.split(": ", 1)
        verb = {"changed": "updated", "missing": "created", "extra": "removed"}[kind]
        print(f"{verb}: {output_dir / name}")
    if not changes:
        print(f"{output_dir}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
