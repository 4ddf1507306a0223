"""examples/gitops: what Flux and Argo CD apply exists, validates, and points at real things.

No Flux, Argo CD or kustomize runs here: each object is checked against what those tools document
as required (Flux: source.toolkit.fluxcd.io/v1 GitRepository, kustomize.toolkit.fluxcd.io/v1
Kustomization, helm.toolkit.fluxcd.io/v2 HelmRelease; Argo CD: argoproj.io/v1alpha1 Application;
kustomize: kustomize.config.k8s.io/v1beta1 Kustomization), and every reference between them is
followed to its target (a source, a dependency, a path in this repository).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgefleet_core.resources import GROUP_VERSION
from edgefleet_core.resources.crds import schema_problems
from edgefleet_core.resources.loading import parse_resource
from tests.support.cel import resource_cel_problems
from tests.unit.gitops.conftest import EXAMPLES, REPO_ROOT

KUSTOMIZATIONS = sorted(EXAMPLES.rglob("kustomization.yaml"))
GO_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
REPO_URL = "https://git.example.com/your-org/edgefleet.git"
"""The placeholder for the user's repository, the same in every file (the docs say to replace it)."""


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _applied() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every object a kustomization under examples/gitops lists."""
    for kustomization in KUSTOMIZATIONS:
        for entry in yaml.safe_load(kustomization.read_text(encoding="utf-8"))["resources"]:
            for document in _documents(kustomization.parent / entry):
                yield kustomization.parent / entry, document


def _of_kind(api_version: str, kind: str) -> list[dict[str, Any]]:
    return [d for _, d in _applied() if (d.get("apiVersion"), d.get("kind")) == (api_version, kind)]


# ------------------------------------------------------------------------------ kustomize


def test_there_are_the_four_folders() -> None:
    assert [k.parent.name for k in KUSTOMIZATIONS] == ["argocd", "fleet", "flux", "operator"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.parent.name)
def test_a_kustomization_lists_exactly_the_files_beside_it(kustomization: Path) -> None:
    body = yaml.safe_load(kustomization.read_text(encoding="utf-8"))
    assert (body["apiVersion"], body["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    assert set(body) <= {"apiVersion", "kind", "resources"}, "no transformer: a namespace would land on DeviceClasses"
    listed = body["resources"]
    assert len(listed) == len(set(listed))
    for entry in listed:
        assert (kustomization.parent / entry).is_file(), f"{kustomization}: {entry} does not exist"
    beside = {p.name for p in kustomization.parent.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == beside, "a file that is not listed is never applied"


# ------------------------------------------------------------------------------ the fleet


def test_the_fleet_is_device_classes_and_edge_models_that_validate() -> None:
    fleet = [(path, d) for path, d in _applied() if path.parent.name == "fleet"]
    assert {d["kind"] for _, d in fleet} == {"DeviceClass", "EdgeModel"}
    for path, document in fleet:
        assert document["apiVersion"] == GROUP_VERSION
        assert schema_problems(document["kind"], document) == [], path
        assert resource_cel_problems(document["kind"], document) == [], path
        parse_resource(document, str(path))  # the operator's own model accepts it too


def test_every_edge_model_targets_a_class_of_the_fleet_and_pins_the_files_to_upload() -> None:
    classes = {d["metadata"]["name"] for d in _of_kind(GROUP_VERSION, "DeviceClass")}
    models = _of_kind(GROUP_VERSION, "EdgeModel")
    assert models
    for model in models:
        assert set(model["spec"]["targets"]["deviceClasses"]) <= classes
        # In a cluster the sources come from the object store; the docs say which local file to upload.
        for pinned in (model["spec"]["source"], model["spec"]["accuracy"]["evaluationData"]):
            assert pinned["uri"].startswith("s3://")
            local = REPO_ROOT / "examples" / "models" / pinned["uri"].rsplit("/", 1)[1]
            assert hashlib.sha256(local.read_bytes()).hexdigest() == pinned["sha256"], local


def test_argo_cd_applies_device_classes_before_edge_models() -> None:
    def wave(document: dict[str, Any]) -> int:
        return int(document["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-wave", "0"))

    classes = [wave(d) for d in _of_kind(GROUP_VERSION, "DeviceClass")]
    models = [wave(d) for d in _of_kind(GROUP_VERSION, "EdgeModel")]
    assert max(classes) < min(models)


# ------------------------------------------------------------------------------ Flux


def _by_name(api_version: str, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _of_kind(api_version, kind)}


def _check_source_ref(owner: dict[str, Any], ref: dict[str, Any]) -> None:
    # A ref without a namespace means the owner's namespace.
    assert set(ref) <= {"apiVersion", "kind", "name", "namespace"}
    source = _by_name("source.toolkit.fluxcd.io/v1", ref["kind"]).get(ref["name"])
    assert source is not None, f"{owner['metadata']['name']}: no {ref['kind']} {ref['name']}"
    assert ref.get("namespace", owner["metadata"]["namespace"]) == source["metadata"]["namespace"]


def test_flux_git_repository() -> None:
    repositories = _by_name("source.toolkit.fluxcd.io/v1", "GitRepository")
    assert list(repositories) == ["edgefleet"]
    spec = repositories["edgefleet"]["spec"]
    assert spec["url"] == REPO_URL
    assert GO_DURATION.match(spec["interval"])
    assert set(spec["ref"]) <= {"branch", "tag", "semver", "name", "commit"}
    assert spec["ref"]


def test_flux_kustomizations_apply_folders_of_this_repository_and_wait() -> None:
    kustomizations = _by_name("kustomize.toolkit.fluxcd.io/v1", "Kustomization")
    assert set(kustomizations) == {"edgefleet-operator", "edgefleet-fleet"}
    for name, kustomization in kustomizations.items():
        spec = kustomization["spec"]
        # Required by the v1 API: interval, prune, sourceRef.
        assert GO_DURATION.match(spec["interval"]), name
        assert isinstance(spec["prune"], bool), name
        _check_source_ref(kustomization, spec["sourceRef"])
        assert (REPO_ROOT / spec["path"] / "kustomization.yaml").is_file(), spec["path"]
        assert spec["wait"] is True
        assert GO_DURATION.match(spec["timeout"])
        for dependency in spec.get("dependsOn", []):
            assert dependency["name"] in kustomizations
    assert kustomizations["edgefleet-fleet"]["spec"]["dependsOn"] == [{"name": "edgefleet-operator"}]
    for check in kustomizations["edgefleet-fleet"]["spec"]["healthCheckExprs"]:
        assert set(check) <= {"apiVersion", "kind", "current", "inProgress", "failed"}
        assert check["current"]


def test_flux_helm_release_installs_the_chart_of_this_repository() -> None:
    releases = _by_name("helm.toolkit.fluxcd.io/v2", "HelmRelease")
    assert list(releases) == ["edgefleet"]
    release = releases["edgefleet"]
    spec = release["spec"]
    assert GO_DURATION.match(spec["interval"])
    assert GO_DURATION.match(spec["timeout"])
    chart = spec["chart"]["spec"]
    _check_source_ref(release, chart["sourceRef"])
    assert chart["sourceRef"]["kind"] == "GitRepository"
    assert (REPO_ROOT / chart["chart"] / "Chart.yaml").is_file(), "the chart is helm/edgefleet"
    # CRD policies of the v2 API; CreateReplace keeps the CRDs current across chart upgrades.
    assert (spec["install"]["crds"], spec["upgrade"]["crds"]) == ("Create", "CreateReplace")


# ------------------------------------------------------------------------------ Argo CD


SYNC_OPTIONS = {
    "CreateNamespace=true",
    "ServerSideApply=true",
    "SkipDryRunOnMissingResource=true",
    "PruneLast=true",
    "ApplyOutOfSyncOnly=true",
    "Validate=false",
}
"""Sync options Argo CD documents (the subset these examples may use)."""


def test_argo_cd_applications() -> None:
    applications = _by_name("argoproj.io/v1alpha1", "Application")
    assert set(applications) == {"edgefleet-operator", "edgefleet-fleet"}
    for name, application in applications.items():
        assert application["metadata"]["namespace"] == "argocd", name
        spec = application["spec"]
        assert spec["project"] == "default"
        assert spec["destination"]["server"] == "https://kubernetes.default.svc"
        assert spec["destination"]["namespace"]
        source = spec["source"]
        assert (source["repoURL"], source["targetRevision"]) == (REPO_URL, "main")
        assert (REPO_ROOT / source["path"]).is_dir(), source["path"]
        assert set(spec["syncPolicy"]["syncOptions"]) <= SYNC_OPTIONS
        assert spec["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}
    assert applications["edgefleet-fleet"]["spec"]["source"]["path"] == "examples/gitops/fleet"
    assert (REPO_ROOT / applications["edgefleet-operator"]["spec"]["source"]["path"] / "Chart.yaml").is_file()
    # The operator and its CRDs before the fleet.
    waves = {
        n: int(a["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-wave", "0"))
        for n, a in applications.items()
    }
    assert waves["edgefleet-operator"] < waves["edgefleet-fleet"]
