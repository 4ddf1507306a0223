"""The demo's resource files: found in the repository's ``examples/demo``, copied into the run's folder.

The control plane reads the copies (``RUN/resources``), so a fault can change the EdgeModel the way
a user would, by rewriting its file, without touching the repository. The model and evaluation
data the EdgeModel names (``file://../models/...`` next to ``examples/demo``) are copied too and
named relative to the copy, so the run's folder holds everything it was built from.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from edgefleet_core.atomic import write_file_atomic
from edgefleet_operator.demo.errors import DemoSetupError

EDGE_MODEL_FILE: Final = "edgemodel-digits.yaml"
MODELS: Final = "models"
_RELATIVE: Final = ("file://./", "file://../")


def default_source() -> Path:
    """``examples/demo`` of the repository this package runs from (an editable install or a checkout)."""
    return Path(__file__).resolve().parents[3] / "examples" / "demo"


@dataclass(frozen=True)
class DemoClass:
    """A DeviceClass of the demo and the labels its devices carry (its selector's ``matchLabels``)."""

    name: str
    labels: dict[str, str]


@dataclass(frozen=True)
class DemoResources:
    """The run's copy of the resource files."""

    folder: Path
    classes: tuple[DemoClass, ...]
    edge_model: dict[str, Any]
    """The EdgeModel as applied first (sources relative to ``folder``)."""

    @property
    def edge_model_path(self) -> Path:
        return self.folder / EDGE_MODEL_FILE

    @property
    def namespace(self) -> str:
        return str(self.edge_model["metadata"].get("namespace", "default"))

    @property
    def model_name(self) -> str:
        return str(self.edge_model["metadata"]["name"])

    @property
    def model_path(self) -> Path:
        return self.folder / _relative_path(self.edge_model["spec"]["source"]["uri"])

    @property
    def data_path(self) -> Path:
        return self.folder / _relative_path(self.edge_model["spec"]["accuracy"]["evaluationData"]["uri"])

    def write_edge_model(self, document: dict[str, Any]) -> None:
        """Replace the EdgeModel's file at once (the control plane never reads half a file)."""
        write_file_atomic(self.edge_model_path, yaml.safe_dump(document, sort_keys=False).encode())


def _relative_path(uri: str) -> str:
    for prefix in _RELATIVE:
        if uri.startswith(prefix):
            return uri[len("file://") :]
    raise DemoSetupError(f"the demo's EdgeModel names {uri!r}; it must name a file relative to it (file://./...)")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DemoSetupError(f"cannot read {path}: {exc}") from None
    if not isinstance(document, dict):
        raise DemoSetupError(f"{path} does not hold one resource")
    return document


def prepare(source: Path, folder: Path) -> DemoResources:
    """Copy the resource files in ``source`` and the files they name into ``folder``."""
    if not source.is_dir():
        raise DemoSetupError(
            f"the demo's resources are not at {source}: run `edgefleet demo` from a checkout of the repository "
            "(pip install -e .), whose examples/demo and examples/models it uses"
        )
    folder.mkdir(parents=True, exist_ok=True)
    classes: list[DemoClass] = []
    edge_model: dict[str, Any] | None = None
    for path in sorted(source.glob("*.yaml")):
        document = _read_yaml(path)
        kind = document.get("kind")
        if kind == "DeviceClass":
            labels = document["spec"]["selector"].get("matchLabels") or {}
            classes.append(DemoClass(str(document["metadata"]["name"]), {str(k): str(v) for k, v in labels.items()}))
            write_file_atomic(folder / path.name, path.read_bytes())
        elif kind == "EdgeModel":
            edge_model = _copy_sources(document, source, folder)
    if edge_model is None or len(classes) < 2:
        raise DemoSetupError(f"{source} must hold an EdgeModel and at least two DeviceClasses")
    resources = DemoResources(folder, tuple(classes), edge_model)
    resources.write_edge_model(edge_model)
    return resources


def _copy_sources(document: dict[str, Any], source: Path, folder: Path) -> dict[str, Any]:
    """The EdgeModel with its model and data copied to ``folder/models`` and named ``file://./models/...``."""
    document = copy.deepcopy(document)
    spec = document["spec"]
    for holder in (spec["source"], spec["accuracy"]["evaluationData"]):
        original = (source / _relative_path(holder["uri"])).resolve()
        if not original.is_file():
            raise DemoSetupError(f"the demo's EdgeModel names {holder['uri']}, which is not at {original}")
        target = folder / MODELS / original.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(original, target)
        holder["uri"] = f"file://./{MODELS}/{original.name}"
    return document
