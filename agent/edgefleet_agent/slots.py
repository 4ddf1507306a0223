"""A/B slots per model on the device's disk, and the ``current.json`` pointer that says which one serves.

Layout: ``STATE/models/<namespace>/<model>/slot-a/``, ``slot-b/`` (decoded model files and
``manifest.json``) and ``current.json``. A slot folder is published whole with
:func:`write_dir_atomic`; the pointer with :func:`write_file_atomic` (temp file, fsync, rename,
fsync of the folder), so after a crash the pointer is the old one or the new one, and a slot is
absent, the old folder, or the complete new one. Before a slot is served its files are re-hashed
against its manifest (:meth:`ModelSlots.verify`): a half-written or tampered slot is never served.

Pointer states: ``committed`` with no ``trial`` is steady state. Activating a new version writes
``active`` = the new slot, ``committed`` = false and ``trial`` = {slot, version, revision} with the
old active kept as ``previous``; after its self-test passes, :meth:`ModelSlots.commit` clears the
trial; a failed or interrupted trial goes back to ``previous`` (:meth:`ModelSlots.abort_trial`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Self

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from edgefleet_agent.assignments import SlotName
from edgefleet_agent.errors import SlotCorrupt, SlotError
from edgefleet_core.atomic import write_dir_atomic, write_file_atomic
from edgefleet_core.bundle.distribution import MANIFEST, manifest_json
from edgefleet_core.bundle.manifest import BundleManifest, parse_manifest
from edgefleet_core.errors import BundleError

log = logging.getLogger(__name__)

POINTER: Final = "current.json"
SLOT_NAMES: Final[tuple[SlotName, SlotName]] = ("a", "b")
MAX_POINTER_BYTES: Final = 64 * 1024
_HASH_CHUNK: Final = 1 << 20


def other_slot(slot: SlotName) -> SlotName:
    """The slot that is not ``slot``."""
    return "b" if slot == "a" else "a"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Trial(_Record):
    """A version activated but not yet committed: its self-test has not passed."""

    slot: SlotName
    version: str
    revision: int


class SlotPointer(_Record):
    """The content of ``current.json``."""

    active_slot: SlotName | None = None
    active_version: str | None = None
    committed: bool = True
    previous_slot: SlotName | None = None
    """The slot holding the version to roll back to (committed earlier), if any."""
    previous_version: str | None = None
    trial: Trial | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.active_slot is None) != (self.active_version is None):
            raise ValueError("active_slot and active_version go together")
        if (self.previous_slot is None) != (self.previous_version is None):
            raise ValueError("previous_slot and previous_version go together")
        if self.previous_slot is not None and self.previous_slot == self.active_slot:
            raise ValueError("previous_slot must differ from active_slot")
        if (self.trial is None) != self.committed:
            raise ValueError("a pointer is either committed or carries a trial")
        if self.trial is not None and (self.trial.slot, self.trial.version) != (self.active_slot, self.active_version):
            raise ValueError("a trial is the active slot and version")
        return self


@dataclass(frozen=True)
class VerifiedSlot:
    """A slot whose files matched its manifest when they were read."""

    slot: SlotName
    manifest: BundleManifest
    files: dict[str, bytes]
    """Decoded model files by name (``model.onnx``, or ``head.onnx`` and ``tail.onnx``)."""


class ModelSlots:
    """The two slots and the pointer of one model."""

    def __init__(self, root: Path, namespace: str, name: str) -> None:
        self.namespace = namespace
        self.name = name
        self.directory = root / namespace / name

    def __repr__(self) -> str:
        return f"ModelSlots({self.namespace}/{self.name})"

    def slot_dir(self, slot: SlotName) -> Path:
        """The folder of ``slot``."""
        return self.directory / f"slot-{slot}"

    # --- the pointer ---------------------------------------------------------------------------

    def pointer(self) -> SlotPointer:
        """The pointer; an empty one (nothing active) if the model has none yet."""
        path = self.directory / POINTER
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return SlotPointer()
        except OSError as exc:
            raise SlotError(f"{path}: cannot read the slot pointer: {exc.strerror or exc}") from None
        if len(data) > MAX_POINTER_BYTES:
            raise SlotError(f"{path}: slot pointer is {len(data)} bytes, over {MAX_POINTER_BYTES}")
        try:
            return SlotPointer.model_validate_json(data)
        except ValidationError as exc:
            raise SlotError(f"{path}: slot pointer is not valid: {exc.errors()[0]['msg']}") from None

    def write_pointer(self, pointer: SlotPointer) -> None:
        """Replace the pointer atomically and durably."""
        data = json.dumps(pointer.model_dump(mode="json"), sort_keys=True, indent=1).encode()
        write_file_atomic(self.directory / POINTER, data)

    def inactive_slot(self) -> SlotName:
        """The slot a new version is written into: the one not active ("a" when none is)."""
        active = self.pointer().active_slot
        return "a" if active is None else other_slot(active)

    def begin_trial(self, slot: SlotName, version: str, revision: int) -> SlotPointer:
        """Point at ``slot`` as an uncommitted trial, keeping the committed active as the way back."""
        current = self.pointer()
        base = self._committed_view(current)
        keep = base.active_slot is not None and base.active_slot != slot
        pointer = SlotPointer(
            active_slot=slot,
            active_version=version,
            committed=False,
            previous_slot=base.active_slot if keep else None,
            previous_version=base.active_version if keep else None,
            trial=Trial(slot=slot, version=version, revision=revision),
        )
        self.write_pointer(pointer)
        return pointer

    def commit(self) -> SlotPointer:
        """Make the trial the committed active version."""
        current = self.pointer()
        if current.trial is None:
            raise SlotError(f"{self}: no trial to commit")
        pointer = current.model_copy(update={"committed": True, "trial": None})
        self.write_pointer(pointer)
        return pointer

    def abort_trial(self) -> SlotPointer:
        """Go back to the committed version the trial started from (or to nothing)."""
        current = self.pointer()
        pointer = self._committed_view(current)
        if pointer != current:
            self.write_pointer(pointer)
        return pointer

    @staticmethod
    def _committed_view(pointer: SlotPointer) -> SlotPointer:
        # The trial's slot was overwritten by the trial version, so nothing is kept to roll back to.
        if pointer.trial is None:
            return pointer
        return SlotPointer(active_slot=pointer.previous_slot, active_version=pointer.previous_version)

    def fall_back(self) -> SlotPointer:
        """Serve the previous committed slot instead of the active one (the active one is unusable)."""
        current = self._committed_view(self.pointer())
        pointer = SlotPointer(active_slot=current.previous_slot, active_version=current.previous_version)
        self.write_pointer(pointer)
        return pointer

    # --- the slots -----------------------------------------------------------------------------

    def write_slot(self, slot: SlotName, manifest: BundleManifest, files: dict[str, bytes]) -> None:
        """Publish ``files`` and their manifest as ``slot``, replacing whatever it held."""
        expected = {f.name for f in manifest.files}
        if set(files) != expected:
            raise SlotError(f"{self}: files {sorted(files)} are not the manifest's {sorted(expected)}")
        write_dir_atomic(self.slot_dir(slot), {**files, MANIFEST: manifest_json(manifest)})

    def manifest(self, slot: SlotName) -> BundleManifest | None:
        """The manifest ``slot`` holds, or ``None`` when the slot is empty or unreadable."""
        try:
            return parse_manifest((self.slot_dir(slot) / MANIFEST).read_bytes())
        except (OSError, BundleError):
            return None

    def verify(self, slot: SlotName, version: str | None = None) -> VerifiedSlot:
        """Read ``slot`` and check every file against its manifest; :class:`SlotCorrupt` if anything differs."""
        folder = self.slot_dir(slot)
        try:
            manifest = parse_manifest((folder / MANIFEST).read_bytes())
        except OSError as exc:
            raise SlotCorrupt(str(folder), f"no readable manifest ({exc.strerror or exc})") from None
        except BundleError as exc:
            raise SlotCorrupt(str(folder), str(exc)) from None
        if (manifest.model.namespace, manifest.model.name) != (self.namespace, self.name):
            raise SlotCorrupt(str(folder), f"manifest is for {manifest.model.namespace}/{manifest.model.name}")
        if version is not None and manifest.version != version:
            raise SlotCorrupt(str(folder), f"holds version {manifest.version}, not {version}")
        files: dict[str, bytes] = {}
        for entry in manifest.files:
            path = folder / entry.name
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise SlotCorrupt(str(folder), f"{entry.name}: {exc.strerror or exc}") from None
            if len(data) != entry.length or hashlib.sha256(data).hexdigest() != entry.sha256:
                raise SlotCorrupt(str(folder), f"{entry.name} does not match the sha256 and length of its manifest")
            files[entry.name] = data
        return VerifiedSlot(slot, manifest, files)

    def clear_leftovers(self) -> list[str]:
        """Remove what an interrupted atomic write left behind (hidden staging folders and temp files)."""
        removed: list[str] = []
        if not self.directory.is_dir():
            return removed
        for entry in sorted(self.directory.iterdir()):
            if not entry.name.startswith("."):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
        return removed

    def remove(self) -> None:
        """Forget the model: pointer first (so a crash leaves nothing active), then the slots."""
        (self.directory / POINTER).unlink(missing_ok=True)
        shutil.rmtree(self.directory, ignore_errors=True)


class SlotStore:
    """Every model's slots under ``STATE/models``."""

    def __init__(self, models_dir: Path) -> None:
        self.root = models_dir

    def model(self, namespace: str, name: str) -> ModelSlots:
        """The slots of ``namespace/name`` (they need not exist yet)."""
        for part in (namespace, name):
            if not part or Path(part).name != part or part.startswith("."):
                raise SlotError(f"model {namespace}/{name} is not a safe folder name")
        return ModelSlots(self.root, namespace, name)

    def models(self) -> list[ModelSlots]:
        """Every model with a folder on disk, sorted by namespace and name."""
        if not self.root.is_dir():
            return []
        return [
            ModelSlots(self.root, ns.name, model.name)
            for ns in sorted(self.root.iterdir())
            if ns.is_dir() and not ns.name.startswith(".")
            for model in sorted(ns.iterdir())
            if model.is_dir() and not model.name.startswith(".")
        ]
