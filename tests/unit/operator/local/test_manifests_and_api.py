"""The embedded API of ``edgefleet up``: reading manifests like ``kubectl apply -f``, generations, finalizers."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edgefleet_operator.local.api import APPLIED_FROM, FINALIZER, LocalApi
from edgefleet_operator.local.errors import InputError, StateError
from edgefleet_operator.local.manifests import ObjectKey, read_manifests
from edgefleet_operator.local.state import StateDir

EXAMPLES = Path(__file__).resolve().parents[4] / "examples"
MODEL = ObjectKey("EdgeModel", "default", "digits")
CLASS = ObjectKey("DeviceClass", None, "edge-cpu")


@pytest.fixture
def files(tmp_path: Path) -> Path:
    folder = tmp_path / "files"
    folder.mkdir()
    for name in ("deviceclass-edge-cpu.yaml", "edgemodel-digits.yaml"):
        shutil.copy(EXAMPLES / name, folder / name)
    return folder


def _api(tmp_path: Path) -> LocalApi:
    return LocalApi(tmp_path / "api", clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_folder_gives_its_files_not_its_subfolders() -> None:
    manifests = read_manifests([EXAMPLES])
    # examples/valid and examples/invalid are subfolders: not read, as with kubectl apply -f.
    assert [m.key for m in manifests] == [CLASS, MODEL]
    assert all(m.path.parent == EXAMPLES for m in manifests)


def test_every_problem_of_every_file_is_named(files: Path) -> None:
    model = files / "edgemodel-digits.yaml"
    model.write_text(model.read_text().replace("maxDrop: 0.02", "maxDrop: 2"))
    (files / "broken.yaml").write_text("kind: [unclosed\n")
    (files / "twice.yaml").write_text((files / "deviceclass-edge-cpu.yaml").read_text())
    with pytest.raises(InputError) as caught:
        read_manifests([files, files / "missing.yaml"])
    named = {(Path(p.source).name, f.field) for p in caught.value.problems for f in p.problems}
    assert ("edgemodel-digits.yaml", "spec.accuracy.maxDrop") in named
    assert ("broken.yaml", "(document)") in named
    assert ("twice.yaml", "metadata.name") in named
    assert ("missing.yaml", "(file)") in named


def test_an_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="holds no resource files"):
        read_manifests([tmp_path])


def test_apply_creates_then_bumps_generation_only_on_spec_changes(tmp_path: Path, files: Path) -> None:
    api = _api(tmp_path)
    outcome = api.apply(read_manifests([files]))
    assert outcome.created == [CLASS, MODEL]
    stored = api.get(MODEL)
    assert stored is not None
    assert stored.generation == 1
    assert stored.finalizers == [FINALIZER]
    assert stored.applied_from == files / "edgemodel-digits.yaml"
    assert stored.metadata["annotations"][APPLIED_FROM] == str(files / "edgemodel-digits.yaml")
    assert stored.edge_model().spec.accuracy is not None  # the typed model parses back

    assert not api.apply(read_manifests([files])).changed  # the same files: nothing written

    path = files / "edgemodel-digits.yaml"
    path.write_text(path.read_text().replace("app.kubernetes.io/name: digits", "app.kubernetes.io/name: digits2"))
    outcome = api.apply(read_manifests([files]))
    assert outcome.relabeled == [MODEL]
    assert api.get(MODEL).generation == 1  # type: ignore[union-attr]

    path.write_text(path.read_text().replace("maxDrop: 0.02", "maxDrop: 0.03"))
    outcome = api.apply(read_manifests([files]))
    assert outcome.configured == [MODEL]
    assert api.get(MODEL).generation == 2  # type: ignore[union-attr]


def test_status_is_a_subresource(tmp_path: Path, files: Path) -> None:
    api = _api(tmp_path)
    api.apply(read_manifests([files]))
    assert api.write_status(MODEL, {"observedGeneration": 1})
    assert not api.write_status(MODEL, {"observedGeneration": 1})
    stored = api.get(MODEL)
    assert stored is not None
    assert stored.status == {"observedGeneration": 1}
    assert stored.generation == 1
    # Applying the same files keeps the status.
    api.apply(read_manifests([files]))
    assert api.get(MODEL).status == {"observedGeneration": 1}  # type: ignore[union-attr]


def test_a_model_left_out_is_held_by_its_finalizer(tmp_path: Path, files: Path) -> None:
    api = _api(tmp_path)
    api.apply(read_manifests([files]))
    (files / "edgemodel-digits.yaml").unlink()
    outcome = api.apply(read_manifests([files]))
    assert outcome.deleting == [MODEL]
    stored = api.get(MODEL)
    assert stored is not None
    assert stored.deleting

    # Back in the files while it is being finalized: it waits for the finalizer.
    shutil.copy(EXAMPLES / "edgemodel-digits.yaml", files / "edgemodel-digits.yaml")
    assert api.apply(read_manifests([files])).waiting == [MODEL]

    assert api.remove_finalizer(stored, FINALIZER)
    assert api.get(MODEL) is None
    again = api.apply(read_manifests([files]))
    assert again.created == [MODEL]
    recreated = api.get(MODEL)
    assert recreated is not None
    assert recreated.metadata["uid"] != stored.metadata["uid"]


def test_a_device_class_left_out_is_gone_at_once(tmp_path: Path, files: Path) -> None:
    api = _api(tmp_path)
    api.apply(read_manifests([files]))
    (files / "deviceclass-edge-cpu.yaml").unlink()
    assert api.apply(read_manifests([files])).deleted == [CLASS]
    assert api.objects("DeviceClass") == []


def test_a_damaged_stored_object_is_a_clear_error(tmp_path: Path, files: Path) -> None:
    api = _api(tmp_path)
    api.apply(read_manifests([files]))
    path = tmp_path / "api" / "edgemodels" / "default" / "digits.json"
    path.write_text("{not json")
    with pytest.raises(StateError, match=r"digits\.json is not valid JSON"):
        api.objects("EdgeModel")
    body = json.loads((tmp_path / "api" / "deviceclasses" / "edge-cpu.json").read_text())
    body["spec"]["cpu"]["cores"] = "many"
    path.unlink()
    (tmp_path / "api" / "deviceclasses" / "edge-cpu.json").write_text(json.dumps(body))
    with pytest.raises(StateError, match=r"edge-cpu\.json is not a valid DeviceClass \(spec\.cpu\.cores"):
        api.objects("DeviceClass")


def test_the_state_folder_is_locked_and_keys_are_made_once(tmp_path: Path) -> None:
    state = StateDir.at(tmp_path / "state")
    with state.locked():
        assert state.ensure_keys()
        assert not state.ensure_keys()
        before = _tree(state.keys_dir)
        with pytest.raises(StateError, match="in use by another"), state.locked():
            pass
    with state.locked():  # released
        assert _tree(state.keys_dir) == before
    assert (state.root / ".gitignore").read_text().splitlines()[-1] == "*"
    assert state.keys_dir.stat().st_mode & 0o777 == 0o700


def test_keys_half_there_are_not_replaced(tmp_path: Path) -> None:
    state = StateDir.at(tmp_path / "state")
    state.keys_dir.mkdir(parents=True)
    (state.keys_dir / "targets.pem").write_text("x")
    with pytest.raises(StateError, match="no key set"):
        state.ensure_keys()
