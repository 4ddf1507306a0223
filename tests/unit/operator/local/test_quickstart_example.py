"""The quickstart example pins the real digests of its model and data, and the model stays small."""

from __future__ import annotations

import hashlib
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[4]
SCRIPT = ROOT / "scripts" / "make_quickstart_model.py"
script = runpy.run_path(str(SCRIPT))


def test_the_edgemodel_pins_the_files_it_names() -> None:
    document = (ROOT / "examples" / script["EDGE_MODEL_FILE"]).read_text(encoding="utf-8")
    pinned = script["pinned_digests"](document)
    assert set(pinned) == {script["MODEL_FILE"], script["DATA_FILE"]}
    for relative, digest in pinned.items():
        assert hashlib.sha256((ROOT / "examples" / relative).read_bytes()).hexdigest() == digest, relative
    assert script["check"](ROOT / "examples") == []


def test_the_committed_model_is_small() -> None:
    assert (ROOT / "examples" / script["MODEL_FILE"]).stat().st_size < script["MAX_MODEL_BYTES"]


def test_pinning_replaces_only_the_digests() -> None:
    document = (ROOT / "examples" / script["EDGE_MODEL_FILE"]).read_text(encoding="utf-8")
    digests = {script["MODEL_FILE"]: "a" * 64, script["DATA_FILE"]: "b" * 64}
    updated = script["pin"](document, digests)
    assert script["pinned_digests"](updated) == digests
    before, after = document.splitlines(), updated.splitlines()
    assert len(before) == len(after)
    assert sum(1 for a, b in zip(before, after, strict=True) if a != b) == 2


def test_a_document_without_the_lines_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one"):
        script["pin"]("spec: {}\n", {script["MODEL_FILE"]: "a" * 64})


def test_check_names_a_differing_file(tmp_path: Path) -> None:
    examples = tmp_path / "examples"
    (examples / "models").mkdir(parents=True)
    document = (ROOT / "examples" / script["EDGE_MODEL_FILE"]).read_text(encoding="utf-8")
    (examples / script["EDGE_MODEL_FILE"]).write_text(document)
    (examples / script["MODEL_FILE"]).write_bytes(b"not the model")
    problems = script["check"](examples)
    assert any("the file's sha256 is" in p for p in problems)
    assert any("missing" in p for p in problems)
    assert script["main"](["--examples", str(examples), "--check"]) == 1
