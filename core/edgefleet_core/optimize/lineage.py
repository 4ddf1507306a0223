"""Content-addressed ids and lineage records for optimized variants, and the cache they key.

A variant's id is the full sha256 of everything that determines its bytes: the source model's
digest, the canonical (defaults filled in, keys sorted) configuration of every pass, the data the
passes saw, the seed and the versions of the tools. Re-running the same input finds the cached
variant instead of recomputing it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import onnx

from edgefleet_core.atomic import PUBLIC, fsync_dir
from edgefleet_core.errors import ModelError
from edgefleet_core.optimize.model_io import parse_model, serialize
from edgefleet_core.resources.recipe import PassSpec

logger = logging.getLogger(__name__)

TOOLS = ("edgefleet", "onnx", "onnxruntime", "numpy", "torch")


def tool_versions() -> dict[str, str]:
    """Versions of the tools whose behaviour shapes a variant (``absent`` when not installed)."""
    out = {}
    for name in TOOLS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def canonical_pass(spec: PassSpec) -> dict[str, Any]:
    """A pass with its options fully defaulted, in the CRD's field names."""
    return {"type": spec.type, "options": spec.options.model_dump(mode="json", by_alias=True)}


@dataclass(frozen=True)
class Lineage:
    """Where a variant came from; its id is the digest of this record."""

    source_digest: str
    """Digest of the source model's content, external data included."""
    passes: list[dict[str, Any]]
    data_digest: str | None
    seed: int
    target: dict[str, Any] = field(default_factory=dict)
    """What the passes were told about the target (provider, precisions, budget, metric): the same
    recipe gives a different variant for a CPU class than for an OpenVINO class."""
    tools: dict[str, str] = field(default_factory=tool_versions)

    @property
    def variant_id(self) -> str:
        """Full sha256 hex of the canonical record."""
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def lineage_for(
    source_digest: str,
    passes: Sequence[PassSpec],
    data_digest: str | None,
    seed: int,
    target: dict[str, Any] | None = None,
) -> Lineage:
    """The lineage of applying ``passes`` to the source for a target."""
    return Lineage(source_digest, [canonical_pass(p) for p in passes], data_digest, seed, dict(target or {}))


def default_cache_dir() -> Path:
    """``$EDGEFLEET_CACHE`` or ``$XDG_CACHE_HOME/edgefleet`` (``~/.cache/edgefleet``)."""
    explicit = os.environ.get("EDGEFLEET_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefleet"


class VariantCache:
    """Transformed models and their pass records by variant id, one folder each, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root / "variants"

    def get(self, variant_id: str) -> tuple[onnx.ModelProto, list[dict[str, Any]]] | None:
        """The cached model and its pass records, or ``None`` (also when the entry is damaged)."""
        folder = self.root / variant_id
        try:
            data = (folder / "model.onnx").read_bytes()
            records = json.loads((folder / "passes.json").read_text(encoding="utf-8"))
            model = parse_model(data, str(folder / "model.onnx"))
        except (OSError, ValueError, ModelError) as exc:
            if folder.exists():
                logger.warning("ignoring damaged cache entry %s: %s", folder, exc)
            return None
        if not isinstance(records, list):
            return None
        return model, records

    def put(self, variant_id: str, model: onnx.ModelProto, records: list[dict[str, Any]]) -> None:
        """Store a variant; a no-op when a complete entry for the id is there already.

        Ids are content addresses, so concurrent writers of one id write the same bytes and the first
        complete entry is as good as any: each writer stages its own folder and renames it into
        place, and a writer that finds the place taken by a complete entry drops its copy. (Replacing
        the entry instead, as ``write_dir_atomic`` does for outputs, fails with "Directory not empty"
        when two writers race; found by the reliability campaign.) Only a damaged entry (an older
        writer's crash) is replaced.
        """
        if self.get(variant_id) is not None:
            return
        folder = self.root / variant_id
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{variant_id}.", suffix=".tmp"))
        try:
            for name, data in (
                ("model.onnx", serialize(model)),
                ("passes.json", json.dumps(records, indent=1).encode()),
            ):
                with open(staging / name, "wb") as handle:
                    os.fchmod(handle.fileno(), PUBLIC)
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            fsync_dir(staging)
            if not self._rename_into(staging, folder):
                self._set_aside_damaged(folder)
                self._rename_into(staging, folder)  # a writer that got there meanwhile wrote the same
            fsync_dir(self.root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _rename_into(self, staging: Path, folder: Path) -> bool:
        """Move ``staging`` to ``folder``; ``False`` when ``folder`` holds a damaged entry instead."""
        try:
            os.rename(staging, folder)  # onto an existing non-empty folder this fails, never merges
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            return self._complete(folder)  # taken by a complete entry: another writer won the race
        return True

    def _complete(self, folder: Path) -> bool:
        try:
            parse_model((folder / "model.onnx").read_bytes(), str(folder / "model.onnx"))
            return isinstance(json.loads((folder / "passes.json").read_text(encoding="utf-8")), list)
        except (OSError, ValueError, ModelError):
            return False

    def _set_aside_damaged(self, folder: Path) -> None:
        aside = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{folder.name}.", suffix=".damaged"))
        try:
            os.rename(folder, aside / "entry")
        except FileNotFoundError:
            pass  # another writer set it aside first
        finally:
            shutil.rmtree(aside, ignore_errors=True)
