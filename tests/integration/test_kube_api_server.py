"""The Kubernetes API test server is strict where the real one is, and the real kopf runtime works against it.

Each semantic an operator depends on is checked over HTTP (the official client is not installed,
so requests are plain HTTP, as kopf's are); the last tests run kopf itself.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from tests.support.kube_api import (
    CRDS_DIR,
    ApiError,
    KubeApiServer,
    KubeClient,
    kube_api_server,
    matching,
    read_crds,
    running_kube_api,
    spawned_kube_api,
)

pytestmark = pytest.mark.integration

__all__ = ["kube_api_server"]  # the fixture, used by name below

REPO_ROOT = Path(__file__).resolve().parents[2]
VALID = sorted((REPO_ROOT / "examples" / "valid").glob("*.yaml"))
INVALID = sorted((REPO_ROOT / "examples" / "invalid").glob("*.yaml"))
EDGEMODELS = "/apis/edgefleet.io/v1alpha1/namespaces/vision/edgemodels"
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
JsonObject = dict[str, Any]


@pytest.fixture
def client(kube_api_server: KubeApiServer) -> KubeClient:
    kube_api_server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "vision"}})
    return KubeClient(kube_api_server.url)


def _document(path: Path) -> JsonObject:
    loaded: JsonObject = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded


def _model(name: str = "digits", **spec: Any) -> JsonObject:
    source = {"uri": "s3://models/digits.onnx", "sha256": "a" * 64}
    body = {"source": source, "targets": {"deviceClasses": ["x86-cpu"]}, **spec}
    return {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel", "metadata": {"name": name}, "spec": body}


def _configmap(name: str, **labels: str) -> JsonObject:
    return {"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}


def _rv(obj: JsonObject) -> int:
    return int(obj["metadata"]["resourceVersion"])


# ---------------------------------------------------------------- discovery


def test_discovery_serves_builtins_and_the_repository_crds(client: KubeClient) -> None:
    core = client.get("/api/v1").body
    assert {r["name"] for r in core["resources"]} >= {"namespaces", "events", "configmaps", "secrets"}
    assert "leases" not in {r["name"] for r in core["resources"]}
    groups = {g["name"]: g for g in client.get("/apis").body["groups"]}
    assert set(groups) >= {"apiextensions.k8s.io", "coordination.k8s.io", "events.k8s.io", "batch", "edgefleet.io"}
    assert groups["edgefleet.io"]["preferredVersion"]["version"] == "v1alpha1"
    assert client.get("/apis/edgefleet.io").body["kind"] == "APIGroup"
    resources = {r["name"]: r for r in client.get("/apis/edgefleet.io/v1alpha1").body["resources"]}
    assert resources["edgemodels"]["namespaced"] is True
    assert resources["edgemodels"]["shortNames"] == ["em"]
    assert resources["edgemodels"]["singularName"] == "edgemodel"
    assert resources["edgemodels/status"]["verbs"] == ["get", "patch", "update"]
    assert resources["deviceclasses"]["namespaced"] is False
    assert client.get("/version").body["major"] == "1"
    assert client.get("/apis/nothing.example.com/v1").status == 404


def test_a_crd_created_over_http_is_discoverable_served_and_removed_with_its_objects() -> None:
    (crd,) = [c for c in read_crds(CRDS_DIR) if c["metadata"]["name"] == "edgemodels.edgefleet.io"]
    with running_kube_api(crds_dir=None) as server:
        client = KubeClient(server.url)
        assert "edgefleet.io" not in {g["name"] for g in client.get("/apis").body["groups"]}
        assert client.get("/apis/edgefleet.io/v1alpha1/edgemodels").status == 404
        created = client.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        assert created.status == 201, created.body
        established = {c["type"]: c["status"] for c in created.body["status"]["conditions"]}
        assert established["Established"] == "True"
        assert "edgefleet.io" in {g["name"] for g in client.get("/apis").body["groups"]}
        assert client.post("/apis/edgefleet.io/v1alpha1/namespaces/default/edgemodels", _model()).status == 201

        deleted = client.delete("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/edgemodels.edgefleet.io")
        assert deleted.status == 200
        assert client.get("/apis/edgefleet.io/v1alpha1").status == 404
        assert server.list("customresourcedefinitions") == []


def test_a_crd_the_real_server_would_refuse_is_invalid(client: KubeClient) -> None:
    (crd,) = [c for c in read_crds(CRDS_DIR) if c["metadata"]["name"] == "edgemodels.edgefleet.io"]
    crd["metadata"]["name"] = "models.edgefleet.io"
    reply = client.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    assert (reply.status, reply.reason) == (422, "Invalid")
    assert reply.body["details"]["causes"][0]["field"] == "metadata.name"
    crd["metadata"]["name"] = "edgemodels.edgefleet.io"
    crd["spec"]["versions"] = [{"served": True}]
    garbled = client.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    assert (garbled.status, garbled.body["details"]["causes"][0]["field"]) == (422, "spec.versions")


# ---------------------------------------------------------------- create


def test_create_sets_identity_generation_and_a_growing_resource_version(client: KubeClient) -> None:
    first = client.post(EDGEMODELS, _model("a")).body
    second = client.post(EDGEMODELS, _model("b")).body
    for obj in (first, second):
        assert obj["metadata"]["uid"]
        assert obj["metadata"]["creationTimestamp"].endswith("Z")
        assert obj["metadata"]["generation"] == 1
        assert isinstance(obj["metadata"]["resourceVersion"], str)
    assert _rv(second) > _rv(first)
    assert first["spec"]["task"] == "classification"  # the CRD's default
    listed = client.get(EDGEMODELS).body
    assert int(listed["metadata"]["resourceVersion"]) >= _rv(second)
    assert [i["metadata"]["name"] for i in listed["items"]] == ["a", "b"]


def test_generate_name_gives_fresh_names_as_kopf_posts_events(client: KubeClient) -> None:
    event = {
        "metadata": {"namespace": "vision", "generateName": "kopf-event-"},
        "type": "Normal",
        "reason": "Logging",
        "message": "hello",
        "involvedObject": {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel", "namespace": "vision"},
        "firstTimestamp": "2024-01-01T00:00:00.123456+00:00",
    }
    names = {client.post("/api/v1/namespaces/vision/events", event).body["metadata"]["name"] for _ in range(3)}
    assert len(names) == 3
    assert all(n.startswith("kopf-event-") and len(n) == len("kopf-event-") + 5 for n in names)


def test_create_refusals_are_status_objects_with_the_right_reason(client: KubeClient) -> None:
    assert client.post(EDGEMODELS, _model("twice")).status == 201
    again = client.post(EDGEMODELS, _model("twice"))
    assert (again.status, again.reason) == (409, "AlreadyExists")
    assert (again.body["kind"], again.body["details"]["name"]) == ("Status", "twice")
    missing = client.post("/apis/edgefleet.io/v1alpha1/namespaces/nowhere/edgemodels", _model())
    assert (missing.status, missing.reason) == (404, "NotFound")
    assert missing.body["message"] == 'namespaces "nowhere" not found'
    other_namespace = client.post(EDGEMODELS, {**_model(), "metadata": {"name": "x", "namespace": "default"}})
    assert (other_namespace.status, other_namespace.reason) == (400, "BadRequest")
    wrong_kind = client.post(EDGEMODELS, {**_model(), "kind": "DeviceClass"})
    assert wrong_kind.status == 400
    malformed = client.request("POST", EDGEMODELS, raw=b"{not json")
    assert (malformed.status, malformed.reason) == (400, "BadRequest")
    nameless = client.post(EDGEMODELS, {**_model(), "metadata": {}})
    assert (nameless.status, nameless.reason) == (422, "Invalid")
    bad_name = client.post(CONFIGMAPS, _configmap("Not_A_Name"))
    assert (bad_name.status, bad_name.body["details"]["causes"][0]["field"]) == (422, "metadata.name")
    assert client.request("PUT", "/apis").status == 405


# ---------------------------------------------------------------- replace, patch, generation


def test_replace_with_a_stale_resource_version_conflicts(client: KubeClient) -> None:
    created = client.post(EDGEMODELS, _model()).body
    changed = {**created, "spec": {**created["spec"], "paused": True}}
    first = client.put(f"{EDGEMODELS}/digits", changed)
    assert first.status == 200
    assert _rv(first.body) > _rv(created)
    stale = client.put(f"{EDGEMODELS}/digits", changed)
    assert (stale.status, stale.reason) == (409, "Conflict")
    assert "the object has been modified" in stale.body["message"]
    unconditional = {**changed, "metadata": {"name": "digits"}}
    refused = client.put(f"{EDGEMODELS}/digits", unconditional)
    assert refused.status == 422  # custom resources need a resourceVersion on update
    configmap = client.post(CONFIGMAPS, _configmap("plain")).body
    assert client.put(f"{CONFIGMAPS}/plain", {**_configmap("plain"), "data": {"k": "w"}}).status == 200
    assert _rv(client.get(f"{CONFIGMAPS}/plain").body) > _rv(configmap)  # built-ins accept unconditional updates
    assert client.put(f"{CONFIGMAPS}/other", _configmap("plain")).status == 400  # name differs from the URL


def test_generation_counts_spec_changes_only(client: KubeClient) -> None:
    created = client.post(EDGEMODELS, _model()).body
    labelled = client.merge_patch(f"{EDGEMODELS}/digits", {"metadata": {"labels": {"team": "vision"}}}).body
    assert labelled["metadata"]["generation"] == 1
    status = client.merge_patch(f"{EDGEMODELS}/digits/status", {"status": {"classes": 1}}).body
    assert status["metadata"]["generation"] == 1
    spec = client.merge_patch(f"{EDGEMODELS}/digits", {"spec": {"paused": True}}).body
    assert spec["metadata"]["generation"] == 2
    same = client.merge_patch(f"{EDGEMODELS}/digits", {"spec": {"paused": True}}).body
    assert same["metadata"]["resourceVersion"] == spec["metadata"]["resourceVersion"]  # a no-op writes nothing
    assert _rv(spec) > _rv(status) > _rv(labelled) > _rv(created)


def test_status_subresource_splits_what_each_write_may_change(client: KubeClient) -> None:
    created = client.post(EDGEMODELS, {**_model(), "status": {"classes": 9}}).body
    assert "status" not in created  # dropped on create
    ignored = client.merge_patch(f"{EDGEMODELS}/digits", {"status": {"classes": 3}}).body
    assert "status" not in ignored
    written = client.merge_patch(f"{EDGEMODELS}/digits/status", {"status": {"classes": 3}, "spec": {"paused": True}})
    assert written.body["status"] == {"classes": 3}
    assert written.body["spec"]["paused"] is False  # spec does not change through /status
    put = client.put(f"{EDGEMODELS}/digits/status", {**written.body, "status": {"classes": 4}})
    assert put.body["status"] == {"classes": 4}
    invalid = client.merge_patch(f"{EDGEMODELS}/digits/status", {"status": {"rolloutPhase": "Sideways"}})
    assert invalid.status == 422
    assert invalid.body["details"]["causes"][0] == {
        "reason": "FieldValueNotSupported",
        "message": (
            'Unsupported value: "Sideways": supported values: "Pending", "Progressing", "Paused", '
            '"Succeeded", "RolledBack", "Failed"'
        ),
        "field": "status.rolloutPhase",
    }
    client.post(CONFIGMAPS, _configmap("no-status"))
    assert client.merge_patch(f"{CONFIGMAPS}/no-status/status", {"status": {}}).status == 404


def test_patches_as_kopf_sends_them(client: KubeClient) -> None:
    created = client.post(EDGEMODELS, _model()).body
    path = f"{EDGEMODELS}/digits"
    test_rv = {"op": "test", "path": "/metadata/resourceVersion", "value": created["metadata"]["resourceVersion"]}
    add = {"op": "add", "path": "/metadata/finalizers", "value": ["kopf.zalando.org/KopfFinalizerMarker"]}
    added = client.json_patch(path, [test_rv, add])
    assert (added.status, added.body["metadata"]["finalizers"]) == (200, ["kopf.zalando.org/KopfFinalizerMarker"])
    stale_test = client.json_patch(path, [test_rv, {"op": "remove", "path": "/metadata/finalizers"}])
    assert (stale_test.status, stale_test.reason) == (422, "Invalid")  # kopf retries on 422
    stale_merge = client.merge_patch(path, {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}})
    assert (stale_merge.status, stale_merge.reason) == (409, "Conflict")
    strategic = client.request(
        "PATCH", path, {"spec": {"paused": True}}, content_type="application/strategic-merge-patch+json"
    )
    assert strategic.body["spec"]["paused"] is True
    apply = client.request("PATCH", path, {"spec": {}}, content_type="application/apply-patch+yaml")
    assert apply.status == 415
    assert client.merge_patch(f"{EDGEMODELS}/absent", {"spec": {}}).status == 404


# ---------------------------------------------------------------- delete and finalizers


def test_finalizers_hold_a_deleted_object_until_they_are_removed(client: KubeClient) -> None:
    created = client.post(EDGEMODELS, {**_model(), "metadata": {"name": "digits", "finalizers": ["x.io/cleanup"]}})
    with client.watch(EDGEMODELS, timeout=5, resourceVersion=created.body["metadata"]["resourceVersion"]) as watch:
        deleting = client.delete(f"{EDGEMODELS}/digits", {"propagationPolicy": "Foreground"})
        assert deleting.status == 200
        assert deleting.body["metadata"]["deletionTimestamp"]
        assert deleting.body["metadata"]["generation"] == 2  # marking for deletion counts as a change
        assert client.get(f"{EDGEMODELS}/digits").status == 200
        more = client.merge_patch(f"{EDGEMODELS}/digits", {"metadata": {"finalizers": ["x.io/cleanup", "y.io/late"]}})
        assert more.status == 422
        assert "no new finalizers can be added" in more.body["message"]
        done = client.merge_patch(f"{EDGEMODELS}/digits", {"metadata": {"finalizers": None}})
        assert done.status == 200
        assert client.get(f"{EDGEMODELS}/digits").status == 404
        events = watch.take(2)
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
    assert _rv(events[1]["object"]) > _rv(events[0]["object"])


def test_delete_without_finalizers_is_immediate_and_checks_its_options(client: KubeClient) -> None:
    client.post(CONFIGMAPS, _configmap("gone"))
    wrong_uid = client.delete(f"{CONFIGMAPS}/gone", {"preconditions": {"uid": "not-it"}})
    assert (wrong_uid.status, wrong_uid.reason) == (409, "Conflict")
    assert client.delete(f"{CONFIGMAPS}/gone", {"propagationPolicy": "Sideways"}).status == 400
    deleted = client.delete(f"{CONFIGMAPS}/gone", propagationPolicy="Background")
    assert (deleted.status, deleted.body["status"]) == (200, "Success")
    assert client.get(f"{CONFIGMAPS}/gone").status == 404
    assert client.delete(f"{CONFIGMAPS}/gone").status == 404


def test_deleting_a_namespace_deletes_its_contents_and_owners_take_dependents(
    kube_api_server: KubeApiServer, client: KubeClient
) -> None:
    owner = client.post(EDGEMODELS, _model("owner")).body
    reference = {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgeModel",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
    }
    dependent = {"metadata": {"name": "owned", "ownerReferences": [reference]}}
    assert client.post("/api/v1/namespaces/vision/configmaps", dependent).status == 201
    client.delete(f"{EDGEMODELS}/owner")
    assert kube_api_server.get("configmaps", "owned", "vision") is None  # garbage-collected
    client.post("/api/v1/namespaces/vision/configmaps", _configmap("kept", app="x"))
    client.post(EDGEMODELS, {**_model("held"), "metadata": {"name": "held", "finalizers": ["x.io/hold"]}})
    client.delete("/api/v1/namespaces/vision")
    assert kube_api_server.get("namespaces", "vision")["status"]["phase"] == "Terminating"  # type: ignore[index]
    refused = client.post("/api/v1/namespaces/vision/configmaps", _configmap("late"))
    assert (refused.status, refused.reason) == (403, "Forbidden")
    assert kube_api_server.get("configmaps", "kept", "vision") is None
    client.merge_patch(f"{EDGEMODELS}/held", {"metadata": {"finalizers": []}})
    kube_api_server.wait_gone("namespaces", "vision", timeout=5)


# ---------------------------------------------------------------- list and selectors


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=web", ["a", "b"]),
        ("app==web", ["a", "b"]),
        ("app!=web", ["c", "d"]),
        ("tier in (front, back)", ["a", "c"]),
        ("tier notin (front)", ["b", "c", "d"]),
        ("tier", ["a", "c"]),
        ("!tier", ["b", "d"]),
        ("app=web,tier=front", ["a"]),
    ],
)
def test_label_selectors(client: KubeClient, selector: str, expected: list[str]) -> None:
    for name, labels in {
        "a": {"app": "web", "tier": "front"},
        "b": {"app": "web"},
        "c": {"app": "db", "tier": "back"},
        "d": {},
    }.items():
        client.post(CONFIGMAPS, _configmap(name, **labels))
    found = client.get(CONFIGMAPS, labelSelector=selector).body["items"]
    assert [i["metadata"]["name"] for i in found] == expected
    assert "kind" not in found[0]  # built-in list items leave kind and apiVersion to the list


def test_field_selectors_and_cluster_wide_lists(client: KubeClient) -> None:
    client.post(CONFIGMAPS, _configmap("here"))
    client.post("/api/v1/namespaces/vision/configmaps", _configmap("there"))
    everywhere = client.get("/api/v1/configmaps").body["items"]
    assert {(i["metadata"]["namespace"], i["metadata"]["name"]) for i in everywhere} == {
        ("default", "here"),
        ("vision", "there"),
    }
    by_name = client.get("/api/v1/configmaps", fieldSelector="metadata.name=there").body["items"]
    assert [i["metadata"]["namespace"] for i in by_name] == ["vision"]
    not_here = client.get("/api/v1/configmaps", fieldSelector="metadata.namespace!=default").body["items"]
    assert [i["metadata"]["name"] for i in not_here] == ["there"]
    assert client.get("/api/v1/configmaps", fieldSelector="data.k=v").status == 400
    assert client.get("/api/v1/configmaps", labelSelector="a in (b").status == 400


def test_lists_page_with_limit_and_continue(client: KubeClient) -> None:
    for index in range(5):
        client.post(CONFIGMAPS, _configmap(f"cm-{index}"))
    first = client.get(CONFIGMAPS, limit="2").body
    assert [i["metadata"]["name"] for i in first["items"]] == ["cm-0", "cm-1"]
    assert first["metadata"]["remainingItemCount"] == 3
    rest = client.get(CONFIGMAPS, limit="10", **{"continue": first["metadata"]["continue"]}).body
    assert [i["metadata"]["name"] for i in rest["items"]] == ["cm-2", "cm-3", "cm-4"]
    assert "continue" not in rest["metadata"]


# ---------------------------------------------------------------- watch


def test_watch_resumes_from_a_resource_version(kube_api_server: KubeApiServer, client: KubeClient) -> None:
    created = client.post(EDGEMODELS, _model()).body
    client.merge_patch(f"{EDGEMODELS}/digits", {"spec": {"paused": True}})
    client.post(CONFIGMAPS, _configmap("noise"))  # another resource: not in this watch
    with client.watch(EDGEMODELS, timeout=5, resourceVersion=created["metadata"]["resourceVersion"]) as watch:
        (event,) = watch.take(1)
        kube_api_server.close_watches()
        assert watch.rest() == []  # nothing else was pending
    assert (event["type"], event["object"]["kind"], event["object"]["spec"]["paused"]) == (
        "MODIFIED",
        "EdgeModel",
        True,
    )
    with client.watch("/apis/edgefleet.io/v1alpha1/edgemodels", timeout=5) as watch:
        (event,) = watch.take(1)
    assert event["type"] == "ADDED"  # no version: the current state first


def test_watch_ends_after_timeout_seconds(client: KubeClient) -> None:
    client.post(CONFIGMAPS, _configmap("one"))
    with client.watch(CONFIGMAPS, timeout=5, timeoutSeconds="1") as watch:
        assert [e["type"] for e in watch.rest()] == ["ADDED"]  # rest() returns: the server ended the stream


def test_watch_with_initial_events_ends_them_with_a_bookmark(client: KubeClient) -> None:
    client.post(EDGEMODELS, _model())
    params = {"sendInitialEvents": "true", "resourceVersionMatch": "NotOlderThan", "allowWatchBookmarks": "true"}
    with client.watch(EDGEMODELS, timeout=5, **params) as watch:
        added, marker = watch.take(2)
    assert added["type"] == "ADDED"
    assert marker["type"] == "BOOKMARK"
    assert marker["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_watch_from_a_forgotten_resource_version_gets_410(kube_api_server: KubeApiServer, client: KubeClient) -> None:
    created = client.post(EDGEMODELS, _model()).body
    client.merge_patch(f"{EDGEMODELS}/digits", {"spec": {"paused": True}})
    kube_api_server.compact()
    with client.watch(EDGEMODELS, timeout=5, resourceVersion=created["metadata"]["resourceVersion"]) as watch:
        events = watch.rest()
    assert [e["type"] for e in events] == ["ERROR"]
    assert (events[0]["object"]["code"], events[0]["object"]["reason"]) == (410, "Expired")
    ahead = str(int(kube_api_server.resource_version) + 100)  # e.g. a client of an earlier server run
    with client.watch(EDGEMODELS, timeout=5, resourceVersion=ahead) as watch:
        (event,) = watch.rest()
    assert (event["type"], event["object"]["code"]) == ("ERROR", 504)


def test_a_selector_watch_sees_objects_enter_and_leave_its_view(
    kube_api_server: KubeApiServer, client: KubeClient
) -> None:
    start = client.post(CONFIGMAPS, _configmap("moving")).body["metadata"]["resourceVersion"]
    client.merge_patch(f"{CONFIGMAPS}/moving", {"metadata": {"labels": {"app": "web"}}})
    client.merge_patch(f"{CONFIGMAPS}/moving", {"data": {"k": "w"}})
    client.merge_patch(f"{CONFIGMAPS}/moving", {"metadata": {"labels": {"app": "db"}}})
    with client.watch(CONFIGMAPS, timeout=5, resourceVersion=start, labelSelector="app=web") as watch:
        events = watch.take(3)
        kube_api_server.close_watches()
        assert watch.rest() == []
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]


@pytest.mark.parametrize("abort", [False, True])
def test_close_watches_ends_every_open_stream(kube_api_server: KubeApiServer, client: KubeClient, abort: bool) -> None:
    with client.watch(CONFIGMAPS, timeout=5) as first, client.watch(EDGEMODELS, timeout=5) as second:
        kube_api_server.wait_until(lambda: kube_api_server.open_watches() == 2, timeout=5)
        assert kube_api_server.close_watches(abort=abort) == 2
        for watch in (first, second):
            if abort:
                with pytest.raises(http.client.IncompleteRead):
                    watch.rest()
            else:
                assert watch.rest() == []


# ---------------------------------------------------------------- schema validation


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_examples_are_accepted(kube_api_server: KubeApiServer, path: Path) -> None:
    document = _document(path)
    namespace = document["metadata"].get("namespace")
    if namespace and kube_api_server.get("namespaces", namespace) is None:
        kube_api_server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    created = kube_api_server.create(document)
    assert created["metadata"]["resourceVersion"]


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_examples_are_refused_naming_the_field(
    kube_api_server: KubeApiServer, client: KubeClient, path: Path
) -> None:
    expected = path.read_text(encoding="utf-8").splitlines()[0].removeprefix("# expect-invalid: ").strip()
    document = _document(path)
    collection = kube_api_server.resource_of(document).path(document["metadata"].get("namespace"))
    reply = client.post(collection, document, fieldValidation="Strict")
    if reply.status == 400:  # an unknown field: strict decoding refuses it before validation, as kubectl sees it
        assert reply.reason == "BadRequest"
        assert f'unknown field "{expected}"' in reply.body["message"]
        return
    assert (reply.status, reply.reason) == (422, "Invalid"), reply.body
    fields = [c["field"] for c in reply.body["details"]["causes"]]
    assert any(f == expected or f.startswith((f"{expected}.", f"{expected}[")) for f in fields), fields


def test_updates_are_checked_by_the_cel_rules_of_what_changed(client: KubeClient) -> None:
    client.post(EDGEMODELS, _model())
    broken = client.merge_patch(f"{EDGEMODELS}/digits", {"spec": {"partition": {"policy": "manual"}}})
    assert (broken.status, broken.body["details"]["causes"][0]["field"]) == (422, "spec.partition")
    assert "cut must name at least one tensor" in broken.body["message"]
    waves = {"spec": {"rollout": {"waves": [{"percent": 50}, {"percent": 10}, {"percent": 100}]}}}
    assert client.merge_patch(f"{EDGEMODELS}/digits", waves).status == 422


def test_unknown_fields_are_pruned_with_a_warning_by_default(client: KubeClient) -> None:
    reply = client.post(EDGEMODELS, {**_model(), "extra": 1, "spec": {**_model()["spec"], "maxSurge": 2}})
    assert reply.status == 201
    assert "extra" not in reply.body
    assert "maxSurge" not in reply.body["spec"]
    assert sorted(reply.warnings) == ['unknown field "extra"', 'unknown field "spec.maxSurge"']
    ignored = client.post(EDGEMODELS, {**_model("quiet"), "extra": 1}, fieldValidation="Ignore")
    assert (ignored.status, ignored.warnings) == (201, [])


WIDGET_SCHEMA: JsonObject = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "properties": {
                "port": {"x-kubernetes-int-or-string": True},
                "note": {"type": "string", "nullable": True},
                "size": {"type": "integer", "default": 3, "minimum": 1},
                "count": {"type": "integer", "format": "int32"},
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "template": {
                    "type": "object",
                    "x-kubernetes-embedded-resource": True,
                    "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                },
            },
        },
        "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
    },
}
WIDGETS = "/apis/example.com/v1/widgets"


def _widget_crd() -> JsonObject:
    version = {"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": WIDGET_SCHEMA}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Cluster",
            "names": {"kind": "Widget", "plural": "widgets"},
            "versions": [version],
        },
    }


def _widget(name: str, **spec: Any) -> JsonObject:
    return {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}


def test_structural_schema_extensions(client: KubeClient) -> None:
    assert client.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", _widget_crd()).status == 201
    template = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"any": 1}, "junk": 1}
    created = client.post(
        WIDGETS,
        _widget("w", port="http", note=None, size=None, extra={"deep": {"er": [1]}}, template=template),
    ).body
    assert created["spec"]["port"] == "http"
    assert created["spec"]["note"] is None  # nullable: kept
    assert created["spec"]["size"] == 3  # null where not nullable is dropped, then defaulted
    assert created["spec"]["extra"] == {"deep": {"er": [1]}}  # x-kubernetes-preserve-unknown-fields
    assert created["spec"]["template"] == {k: v for k, v in template.items() if k != "junk"}  # embedded resource
    assert client.post(WIDGETS, _widget("numbered", port=8080)).status == 201
    refusals = {
        "spec.port": _widget("bad-port", port=1.5),
        "spec.count": _widget("too-many", count=2**40),
        "spec.size": _widget("too-small", size=0),
    }
    for field, body in refusals.items():
        reply = client.post(WIDGETS, body)
        assert (reply.status, reply.body["details"]["causes"][0]["field"]) == (422, field), reply.body
    assert client.get("/apis/example.com/v1/namespaces/vision/widgets").status == 404  # cluster-scoped


def test_without_a_status_subresource_status_is_part_of_the_object(client: KubeClient) -> None:
    client.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", _widget_crd())
    created = client.post(WIDGETS, {**_widget("w"), "status": {"phase": "New"}}).body
    assert created["status"] == {"phase": "New"}
    changed = client.merge_patch(f"{WIDGETS}/w", {"status": {"phase": "Done"}}).body
    assert changed["status"] == {"phase": "Done"}
    assert changed["metadata"]["generation"] == 2  # without the subresource, status counts as a change
    assert client.merge_patch(f"{WIDGETS}/w/status", {"status": {}}).status == 404


def test_leases_events_and_jobs_are_served_with_their_checks(client: KubeClient) -> None:
    leases = "/apis/coordination.k8s.io/v1/namespaces/default/leases"
    lease = {"metadata": {"name": "edgefleet-operator"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}
    created = client.post(leases, lease).body
    renewed = {**created, "spec": {**created["spec"], "renewTime": "2024-01-01T00:00:00.000000Z"}}
    assert client.put(f"{leases}/edgefleet-operator", renewed).status == 200
    assert client.put(f"{leases}/edgefleet-operator", renewed).status == 409  # the other replica lost the race
    bad_time = client.merge_patch(f"{leases}/edgefleet-operator", {"spec": {"renewTime": "yesterday"}})
    assert (bad_time.status, bad_time.body["details"]["causes"][0]["field"]) == (422, "spec.renewTime")
    event = {"metadata": {"generateName": "ev-"}, "reason": "Hi", "note": "n", "regarding": {"kind": "EdgeModel"}}
    assert client.post("/apis/events.k8s.io/v1/namespaces/default/events", event).status == 201
    job = {"metadata": {"name": "pipeline"}, "spec": {"template": {"spec": {"containers": []}}}}
    stored = client.post("/apis/batch/v1/namespaces/default/jobs", job).body
    assert (stored["metadata"]["generation"], "status" in stored) == (1, False)  # stored only: nothing runs it
    secret = client.post("/api/v1/namespaces/default/secrets", {"metadata": {"name": "s"}, "stringData": {"k": "v"}})
    assert (secret.body["data"], secret.body["type"]) == ({"k": "dg=="}, "Opaque")


# ---------------------------------------------------------------- audit, faults, helpers, process


def test_audit_log_and_injected_faults(kube_api_server: KubeApiServer, client: KubeClient) -> None:
    fault = kube_api_server.fail_next(2, 503, when=matching(verb="list", resource="configmaps"), retry_after=1)
    first = client.get(CONFIGMAPS)
    assert (first.status, first.reason) == (503, "ServiceUnavailable")
    assert ("Retry-After", "1") in first.headers
    assert [client.get(CONFIGMAPS).status for _ in range(2)] == [503, 200]  # two shots, then real answers
    assert (fault.remaining, len(fault.hits)) == (0, 2)
    kube_api_server.clear_audit_log()
    client.post(CONFIGMAPS, _configmap("audited"))
    client.merge_patch(f"{EDGEMODELS}/absent/status", {"status": {}})
    client.get("/apis")
    records = [
        (r.request.verb, r.request.group, r.request.resource, r.request.subresource, r.request.namespace, r.code)
        for r in kube_api_server.audit_log()
    ]
    assert records == [
        ("create", "", "configmaps", "", "default", 201),
        ("patch", "edgefleet.io", "edgemodels", "status", "vision", 404),
        ("get", "", "", "", "", 200),
    ]


def test_helpers_go_through_the_same_rules(kube_api_server: KubeApiServer) -> None:
    with pytest.raises(ApiError) as refused:
        kube_api_server.create({**_model(), "spec": {"source": {"uri": "nope"}}})
    assert refused.value.code == 422
    created = kube_api_server.apply_object(_model())
    kube_api_server.patch("em", "digits", {"status": {"classes": 2}}, namespace="default", subresource="status")
    replaced = kube_api_server.apply_object(_model(paused=True))
    assert (replaced["metadata"]["generation"], replaced["status"]) == (2, {"classes": 2})
    assert replaced["metadata"]["uid"] == created["metadata"]["uid"]
    found = kube_api_server.wait_for("edgemodels.edgefleet.io", "digits", lambda o: o["spec"]["paused"], "default")
    assert found["metadata"]["resourceVersion"] == replaced["metadata"]["resourceVersion"]
    assert [
        o["metadata"]["name"] for o in kube_api_server.list("EdgeModel", field_selector="metadata.name=digits")
    ] == ["digits"]


def test_the_server_runs_as_a_process_with_its_control_endpoints() -> None:
    with spawned_kube_api() as spawned:
        client = KubeClient(spawned.url)
        assert "edgefleet.io" in {g["name"] for g in client.get("/apis").body["groups"]}
        assert client.post(CONFIGMAPS, _configmap("remote")).status == 201
        audit = client.get("/_kube_api/audit").body
        assert [(r["verb"], r["resource"], r["code"]) for r in audit] == [
            ("get", "", 200),
            ("create", "configmaps", 201),
        ]
        assert client.request("POST", "/_kube_api/close-watches").body == {"closed": 0}


# ---------------------------------------------------------------- the real kopf runtime


@contextmanager
def running_kopf(registry: kopf.OperatorRegistry, **options: Any) -> Iterator[threading.Event]:
    """kopf's operator in a thread with its own event loop, stopped through its stop flag."""
    stop, ready = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(kopf.operator(registry=registry, clusterwide=True, stop_flag=stop, ready_flag=ready, **options))
        except BaseException as exc:  # noqa: BLE001  (re-raised in the test's thread below)
            failures.append(exc)

    thread = threading.Thread(target=run, name="kopf-operator")
    thread.start()
    try:
        assert ready.wait(10), "kopf did not get ready"
        yield stop
    finally:
        stop.set()
        thread.join(20)
    assert not thread.is_alive(), "kopf did not stop"
    assert not failures, failures


def _operator_registry(server_url: str, seen: list[str]) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=server_url, default_namespace="default")

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # The status schema is structural and has no `kopf` field: the server prunes status.kopf, so
        # kopf's progress lives in annotations (as our operator must configure it).
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage()
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage()

    @kopf.on.create("edgefleet.io", "v1alpha1", "edgemodels", registry=registry)
    @kopf.on.update("edgefleet.io", "v1alpha1", "edgemodels", field="spec", registry=registry)
    def reconcile(spec: kopf.Spec, meta: kopf.Meta, body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        patch.status["observedGeneration"] = meta["generation"]
        patch.status["classes"] = len(spec["targets"]["deviceClasses"])
        kopf.info(body, reason="Reconciled", message=f"generation {meta['generation']}")
        seen.append(f"reconcile {meta['generation']}")

    @kopf.on.delete("edgefleet.io", "v1alpha1", "edgemodels", registry=registry)
    def cleanup(meta: kopf.Meta, **_: Any) -> None:
        seen.append(f"cleanup {meta['name']}")

    return registry


def _problems_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Warnings and errors from anyone: kopf, asyncio, aiohttp (the server's request handling) alike."""
    # kopf warns once that it cannot install OS signal handlers outside the main thread: expected.
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING and "OS signals are ignored" not in r.getMessage()
    ]


def test_the_real_kopf_runtime_reconciles_and_finalizes(
    kube_api_server: KubeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    seen: list[str] = []
    kube_api_server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "factory"}})
    with running_kopf(_operator_registry(kube_api_server.url, seen), standalone=True):
        kube_api_server.create(_document(REPO_ROOT / "examples" / "valid" / "edgemodel-minimal.yaml"))
        name, namespace = "anomaly-detector", "factory"
        reconciled = kube_api_server.wait_for(
            "edgemodels",
            name,
            lambda o: (
                o.get("status", {}).get("observedGeneration") == 1
                and "kopf.zalando.org/KopfFinalizerMarker" in o["metadata"].get("finalizers", [])
            ),
            namespace,
        )
        assert reconciled["status"]["classes"] == 1
        events = kube_api_server.wait_until(
            lambda: [e for e in kube_api_server.list("events", namespace) if e["reason"] == "Reconciled"]
        )
        assert events[0]["involvedObject"]["name"] == name
        assert events[0]["metadata"]["name"].startswith("kopf-event-")  # generateName

        kube_api_server.patch("edgemodels", name, {"spec": {"paused": True}}, namespace=namespace)
        kube_api_server.wait_for(
            "edgemodels", name, lambda o: o.get("status", {}).get("observedGeneration") == 2, namespace
        )

        kube_api_server.delete("edgemodels", name, namespace)
        kube_api_server.wait_gone("edgemodels", name, namespace)
    assert seen == ["reconcile 1", "reconcile 2", f"cleanup {name}"]
    assert _problems_logged(caplog) == []
    operator_requests = {
        (r.request.verb, r.request.resource, r.request.subresource) for r in kube_api_server.audit_log()
    }
    assert {
        ("watch", "edgemodels", ""),
        ("patch", "edgemodels", "status"),
        ("create", "events", ""),
    } <= operator_requests
    assert all(r.code < 400 for r in kube_api_server.audit_log()), [
        r for r in kube_api_server.audit_log() if r.code >= 400
    ]


def test_kopf_recovers_from_dropped_watches_and_forgotten_versions(
    kube_api_server: KubeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    seen: list[str] = []
    with running_kopf(_operator_registry(kube_api_server.url, seen), standalone=True):
        kube_api_server.apply_object(_model("first"))
        kube_api_server.wait_for("edgemodels", "first", lambda o: "status" in o, "default")
        lists_before = sum(
            r.request.verb == "list" and r.request.resource == "edgemodels" for r in kube_api_server.audit_log()
        )
        # kopf's next watch finds its resourceVersion forgotten (410 in the stream), so it lists again.
        kube_api_server.fail_next(1, 410, when=matching(verb="watch", resource="edgemodels"), in_stream=True)
        kube_api_server.close_watches(abort=True)
        kube_api_server.apply_object(_model("second"))
        kube_api_server.wait_for("edgemodels", "second", lambda o: "status" in o, "default")
        lists_after = sum(
            r.request.verb == "list" and r.request.resource == "edgemodels" for r in kube_api_server.audit_log()
        )
    assert seen == ["reconcile 1", "reconcile 1"]
    assert lists_after > lists_before
    assert _problems_logged(caplog) == []


def test_kopf_peering_resources_are_served(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with running_kube_api(kopf_peering=True) as server:
        server.create({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "default"}})
        seen: list[str] = []
        with running_kopf(_operator_registry(server.url, seen), standalone=False, identity="replica-a", priority=7):
            peers = server.wait_for("clusterkopfpeerings", "default", lambda o: "replica-a" in o.get("status", {}))
            assert peers["status"]["replica-a"]["priority"] == 7
            server.apply_object(_model())
            server.wait_for("edgemodels", "digits", lambda o: "status" in o, "default")
        assert server.get("clusterkopfpeerings", "default")["status"] == {}  # type: ignore[index]  # gone on exit
    assert seen == ["reconcile 1"]
    assert _problems_logged(caplog) == []
