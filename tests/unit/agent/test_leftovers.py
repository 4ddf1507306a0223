"""Temp files of interrupted writes are removed at start-up; slots' and downloads' own files are not touched."""

from __future__ import annotations

from pathlib import Path

from edgefleet_agent.leftovers import clear_interrupted_writes


def test_temp_files_of_interrupted_writes_are_removed_and_nothing_else(tmp_path: Path) -> None:
    state = tmp_path / "state"
    left = [
        ".agent.json.k2j3.tmp",  # edgefleet_core.atomic.write_file_atomic, killed before the rename
        "reports/.7-demo.wide.json.x1.tmp",
        "tuf/metadata/tmpab12cd",  # python-tuf's _persist_file
        "tuf/metadata/root_history/tmpzz",
    ]
    kept = [
        "agent.json",
        "reports/7-demo.wide.json",
        "tuf/metadata/timestamp.json",
        "tuf/tmp-is-not-a-metadata-folder",
        "downloads/ab.part",  # resumed later
        "models/demo/wide/.slot-a.x.tmp/model.onnx",  # the slots clear their own
    ]
    for name in left + kept:
        (state / name).parent.mkdir(parents=True, exist_ok=True)
        (state / name).write_bytes(b"x")
    assert clear_interrupted_writes(state) == sorted(left)
    assert sorted(str(p.relative_to(state)) for p in state.rglob("*") if p.is_file()) == sorted(kept)
    assert clear_interrupted_writes(state) == []
    assert clear_interrupted_writes(tmp_path / "absent") == []
