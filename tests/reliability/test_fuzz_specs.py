"""Fuzz target: EdgeModel and DeviceClass specs through resource loading and the EdgeModel reconciler.

Documents are generated from the CRDs' own OpenAPI schemas (``crds/``, read through
:func:`custom_resource_definitions`): every property, enum, pattern, bound, list and map the
schema declares, so a field added to a CRD is fuzzed without touching this file. A schema-valid
document still meets the pydantic models' own rules (the CRD's CEL rules, cross-field checks);
then zero to three mutations edit its tree (a field deleted, a value swapped for an extreme or
wrongly typed one, an unknown key added) so the schema checks are fuzzed too.

Two steps, as a resource meets them in the operator:

1. :func:`parse_resource` (schema, defaults, model): a resource, or :class:`ResourceError` with
   at least one problem naming a field and saying what is wrong. Any other exception is a crash.
2. Accepted EdgeModels, with the DeviceClasses accepted in the same input, go through
   :meth:`EdgeModelReconciler.reconcile` (real :func:`build_variant`, real signed repository, the
   source a real tiny CNN): a status comes back — ``Stalled`` with a message when the spec cannot
   be met — or one of the reconciler's own :class:`ReconcileError`. Any other exception is a crash.

Network sources are pointed at files first (the spec's validation is the target, not S3), and
recipes are cut to the passes that run in milliseconds on the tiny CNN for the quick budget.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet_core.bundle.publisher import Publisher
from edgefleet_core.errors import ResourceError
from edgefleet_core.resources.crds import custom_resource_definitions
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_device import EdgeDevice
from edgefleet_core.resources.edge_model import EdgeModel
from edgefleet_core.resources.loading import parse_resource
from edgefleet_core.signing import KeySet
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.state import FleetState
from edgefleet_operator.reconcile import EdgeModelReconciler, ReconcileError, SourceResolver
from edgefleet_operator.reconcile.status import STALLED, find_condition
from edgefleet_operator.rollout import PublishedBundles
from tests.support.json_paths import at
from tests.support.json_paths import paths as json_paths
from tests.support.reliability import fuzz_examples, record_fuzz
from tests.support.tiny_models import tiny_cnn

pytestmark = [pytest.mark.reliability, pytest.mark.fuzz]

PARSE = "CR specs: parse_resource (CRD schema, defaults, pydantic models)"
RECONCILE = "CR specs: EdgeModelReconciler.reconcile (accepted EdgeModel + DeviceClasses)"
GROUP_VERSION = "edgefleet.io/v1alpha1"
CRASHES_FIXED = {
    PARSE: [],
    RECONCILE: [
        "DeviceClass spec.accelerator.link.bandwidthMBps 5e-324 (valid: > 0) priced every cut at infinity; "
        "pydantic's ValidationError escaped reconcile from partition.plan.price (now a PartitionError: "
        "auto partitioning ships the whole model)",
    ],
}
FAST_PASSES = ("GraphOptimization", "FP16")
"""Passes that take milliseconds on the tiny CNN; a quick run keeps recipes to these."""
Json = Any


# --------------------------------------------------------------------------------------------------
# Documents from an OpenAPI v3 schema


def _from_schema(schema: dict[str, Json], depth: int = 0) -> st.SearchStrategy[Json]:
    """Values the schema accepts, as far as its structural keywords say (CEL rules are the model's)."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if schema.get("x-kubernetes-int-or-string"):
        return st.one_of(st.integers(0, 1000), st.sampled_from(["10%", "50%", "1", "abc"]))
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        return _object(schema, depth)
    if kind == "array":
        return _array(schema, depth)
    if kind == "string":
        return _string(schema)
    return _scalar(kind, schema)


def _array(schema: dict[str, Json], depth: int) -> st.SearchStrategy[list[Json]]:
    items = _from_schema(schema.get("items", {}), depth + 1)
    unique = schema.get("x-kubernetes-list-type") == "set"
    return st.lists(
        items,
        min_size=schema.get("minItems", 0),
        max_size=min(schema.get("maxItems", 3), 3),
        unique_by=(lambda v: json.dumps(v, sort_keys=True)) if unique else None,
    )


def _scalar(kind: str | None, schema: dict[str, Json]) -> st.SearchStrategy[Json]:
    if kind == "integer":
        return st.integers(schema.get("minimum", -(1 << 31)), schema.get("maximum", 1 << 31))
    if kind == "number":
        return st.floats(
            schema.get("minimum"),
            schema.get("maximum"),
            allow_nan=False,
            allow_infinity=False,
            exclude_min=bool(schema.get("exclusiveMinimum")),
            exclude_max=bool(schema.get("exclusiveMaximum")),
        )
    if kind == "boolean":
        return st.booleans()
    return st.one_of(st.none(), st.integers(), st.text(max_size=5))


def _string(schema: dict[str, Json]) -> st.SearchStrategy[str]:
    if schema.get("format") == "date-time":
        return st.sampled_from(["2026-11-22T12:00:00Z", "2026-11-22T12:00:00+01:00"])
    pattern = schema.get("pattern")
    longest = schema.get("maxLength", 64)
    if pattern:
        return st.from_regex(re.compile(pattern), fullmatch=True).filter(lambda s: len(s) <= longest)
    return st.text(min_size=schema.get("minLength", 0), max_size=min(longest, 24))


def _object(schema: dict[str, Json], depth: int) -> st.SearchStrategy[dict[str, Json]]:
    properties = schema.get("properties", {})
    required = set(schema.get("required", []))
    if depth > 8:
        return st.just({})
    fixed = {k: _from_schema(v, depth + 1) for k, v in properties.items() if k in required}
    optional = {k: _from_schema(v, depth + 1) for k, v in properties.items() if k not in required}
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict) and not properties:
        keys = st.from_regex(r"\A[a-z][a-z0-9.-]{0,10}(/[a-z0-9-]{1,8})?\Z")
        return st.dictionaries(keys, _from_schema(extra, depth + 1), max_size=3)
    least = schema.get("minProperties", 0)
    return st.fixed_dictionaries(fixed, optional=optional).filter(lambda d: len(d) >= least)


# --------------------------------------------------------------------------------------------------
# Mutations of a document's tree

_EXTREMES: list[Json] = [None, True, False, 0, -1, 1 << 31, (1 << 63) + 1, -(1 << 63), 1e308, -1e308, 0.5, "",
                         "x" * 5000, "\u0000", "../..", "Gi", "1e3Gi", "99999999999999999999Ti", "0s", "9999999h",
                         "-5%", "101%", [], {}, [None], {"": {}}]  # fmt: skip


def _mutate(draw: st.DrawFn, document: dict[str, Json]) -> None:
    paths = [p for p in json_paths(document["spec"], ("spec",)) if len(p) > 1]
    if not paths:
        return
    path = draw(st.sampled_from(paths))
    parent, key = at(document, path[:-1]), path[-1]
    kind = draw(st.sampled_from(["replace", "replace", "delete", "add", "repeat"]))
    if kind == "replace":
        # Copies: sampled_from reuses the same mutable objects, which later edits would share.
        parent[key] = copy.deepcopy(draw(st.one_of(st.sampled_from(_EXTREMES), st.integers(), st.text(max_size=8))))
    elif kind == "delete":
        del parent[key]
    elif kind == "add" and isinstance(parent[key], dict):
        parent[key][draw(st.sampled_from(["unknownField", "type", "name", "percent"]))] = copy.deepcopy(
            draw(st.sampled_from(_EXTREMES))
        )
    elif kind == "repeat" and isinstance(parent, list):
        parent.insert(key, json.loads(json.dumps(parent[key])))


@functools.cache
def _spec_strategy(kind: str) -> st.SearchStrategy[Json]:
    # Built once per kind: walking a CRD schema into strategies costs more than drawing from them.
    return _from_schema(custom_resource_definitions()[kind].schema["properties"]["spec"])


@st.composite
def _document(draw: st.DrawFn, kind: str, names: st.SearchStrategy[str], mutations: int = 3) -> dict[str, Json]:
    crd = custom_resource_definitions()[kind]
    spec = draw(_spec_strategy(kind))
    metadata: dict[str, Json] = {"name": draw(names), "generation": 1}
    if crd.scope == "Namespaced":
        metadata["namespace"] = "factory"
    document = {"apiVersion": GROUP_VERSION, "kind": kind, "metadata": metadata, "spec": spec}
    for _ in range(draw(st.integers(0, mutations))):
        _mutate(draw, document)
    return document


# --------------------------------------------------------------------------------------------------
# Targets


@pytest.fixture(scope="module")
def executions() -> Iterator[Counter[str]]:
    counts: Counter[str] = Counter()
    yield counts
    for target, count in counts.items():
        record_fuzz(target, executions=count, crashes_fixed=CRASHES_FIXED[target])


def _parsed(document: dict[str, Json]) -> DeviceClass | EdgeModel | EdgeDevice | None:
    """The resource, or ``None`` when it is refused with problems that each name a field and say what is wrong."""
    try:
        return parse_resource(document, "fuzz")
    except ResourceError as error:
        refused = error
    assert refused.problems, "a ResourceError without problems"
    assert all(p.field and p.message for p in refused.problems), refused.problems
    return None


CLASS_NAMES = st.sampled_from(["cpu-small", "npu-kiosk", "gpu-big"])


@settings(max_examples=fuzz_examples(150), deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(document=st.one_of(_document("EdgeModel", st.just("digits")), _document("DeviceClass", CLASS_NAMES),
                          _document("EdgeDevice", st.just("cam-1"))))  # fmt: skip
def test_generated_resources_parse_or_name_their_problems(executions: Counter[str], document: dict[str, Json]) -> None:
    executions[PARSE] += 1
    resource = _parsed(document)
    if resource is not None:
        # An accepted resource has a wire form that parses back to itself (what kopf stores and reads).
        wire = {"apiVersion": GROUP_VERSION, "kind": document["kind"], **resource.to_wire()}
        assert type(resource).model_validate(wire) == resource


@dataclass
class World:
    folder: Path
    source_uri: str
    source_sha256: str
    reconciler: EdgeModelReconciler


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    import hashlib

    folder = tmp_path_factory.mktemp("fuzz-specs")
    source = folder / "model.onnx"
    source.write_bytes(tiny_cnn().SerializeToString(deterministic=True))
    store = LocalStore(folder / "store")
    publisher = Publisher(store, KeySet.generate())
    publisher.ensure_initialized()
    reconciler = EdgeModelReconciler(
        publisher=publisher,
        fleet=FleetState(store),
        sources=SourceResolver(base_dir=folder, http_timeout_s=1.0),
        bundles=PublishedBundles(store),
    )
    return World(folder, source.as_uri(), hashlib.sha256(source.read_bytes()).hexdigest(), reconciler)


def _grounded(world: World, document: dict[str, Json], keep_source: bool, classes: list[str]) -> dict[str, Json]:
    """The document with network URIs pointed at files, the source (mostly) at the real model, fast passes only.

    With ``classes``, the model targets them by name: generated selectors rarely match generated labels.
    """
    grounded: dict[str, Json] = json.loads(json.dumps(document))
    for path in list(json_paths(grounded)):
        if path and isinstance(at(grounded, path), str) and re.match(r"(?i)(s3|https?)://", at(grounded, path)):
            at(grounded, path[:-1])[path[-1]] = f"file://{world.folder}/missing"
    spec = grounded.get("spec")
    if isinstance(spec, dict) and keep_source:
        spec["source"] = {"uri": world.source_uri, "sha256": world.source_sha256}
    if isinstance(spec, dict) and classes:
        spec["targets"] = {"deviceClasses": sorted(set(classes))}
    for node in json_paths(grounded):
        value = at(grounded, node)
        if isinstance(value, dict) and isinstance(value.get("passes"), list):
            value["passes"] = [{"type": p["type"]} for p in value["passes"]
                               if isinstance(p, dict) and p.get("type") in FAST_PASSES]  # fmt: skip
    return grounded


@settings(max_examples=fuzz_examples(40), deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    model=_document("EdgeModel", st.just("digits"), mutations=1),
    classes=st.lists(_document("DeviceClass", CLASS_NAMES, mutations=1), min_size=1, max_size=2),
    keep_source=st.integers(0, 4),
)
def test_accepted_specs_reconcile_to_a_status_or_a_reconcile_error(
    world: World, executions: Counter[str], model: dict[str, Json], classes: list[dict[str, Json]], keep_source: int
) -> None:
    parsed = [c for c in (_parsed(_grounded(world, c, False, [])) for c in classes) if isinstance(c, DeviceClass)]
    named = [c.metadata.name for c in parsed] if keep_source > 1 else []
    resource = _parsed(_grounded(world, model, keep_source > 0, named))
    if not isinstance(resource, EdgeModel):
        return
    executions[RECONCILE] += 1
    started = time.monotonic()
    refused: ReconcileError | None = None
    try:
        result = world.reconciler.reconcile(resource, parsed)
    except ReconcileError as error:
        refused = error
    if refused is not None:
        assert str(refused), "a ReconcileError without a message"
        return
    stalled = find_condition(result.status.conditions or [], STALLED)
    if stalled is not None and stalled.status == "True":
        assert stalled.message, result.status
    assert time.monotonic() - started < 60, "one reconcile of a tiny model took over a minute"
