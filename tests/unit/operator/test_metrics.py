"""The operator's metrics move when the reconciler works: real builds, publishes, stalls, retries and errors.

The reconciler runs over real parts (the pipeline on a tiny CNN, a signed repository in a file store,
the fleet state), as in ``reconcile/test_edge_model.py``; values are read from the reconciler's own
registry. The dispatched-build path uses a dispatcher double that hands back a real build.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefleet_core.bundle.distribution import BundleRef
from edgefleet_core.bundle.publisher import PublishedVariant, Publisher
from edgefleet_core.errors import StoreUnavailable
from edgefleet_core.optimize.model_io import load_model
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import EdgeModel
from edgefleet_core.signing import KeySet
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet import FleetState
from edgefleet_operator.kopf_app import EdgeModelDriver, KopfSettings, _serve_metrics
from edgefleet_operator.metrics import ROLLOUT_PHASES, MetricsListenError, OperatorMetrics, parse_listen
from edgefleet_operator.operator_cli import app
from edgefleet_operator.reconcile import SourceResolver, build_variant
from edgefleet_operator.reconcile.dispatch import Built, DispatchState, Running
from edgefleet_operator.reconcile.edge_model import EdgeModelReconciler
from edgefleet_operator.rollout import PublishedBundles
from edgefleet_operator.runtime import OperatorSettings
from tests.support.tiny_models import tiny_cnn
from tests.unit.operator.reconcile.conftest import CPU, MODEL, NAMESPACE, StagedFile, device_class, edge_model
from tests.unit.operator.reconcile.conftest import model_bytes as serialized
from tests.unit.operator.reconcile.conftest import stage as stage_file

GRAPH_PASS = {"pass": "GraphOptimization", "status": "applied"}
"""The labels of the one pass the test recipe runs."""


@pytest.fixture
def source(tmp_path: Path) -> StagedFile:
    return stage_file(tmp_path / "model.onnx", serialized(tiny_cnn()))


@pytest.fixture(scope="module")
def keys() -> KeySet:
    return KeySet.generate()


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    (tmp_path / "store").mkdir()
    return LocalStore(tmp_path / "store")


@pytest.fixture
def publisher(store: LocalStore, keys: KeySet) -> Publisher:
    made = Publisher(store, keys)
    made.ensure_initialized()
    return made


@pytest.fixture
def make(store: LocalStore, publisher: Publisher, tmp_path: Path) -> Callable[..., EdgeModelReconciler]:
    def reconciler(**options: Any) -> EdgeModelReconciler:
        options.setdefault("publisher", publisher)
        return EdgeModelReconciler(
            fleet=FleetState(store),
            sources=SourceResolver(base_dir=tmp_path),
            bundles=PublishedBundles(store),
            **options,
        )

    return reconciler


def value(metrics: OperatorMetrics, name: str, **labels: str) -> float:
    """The sample's value; 0 when the series does not exist (yet)."""
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def one_hot(metrics: OperatorMetrics, namespace: str, name: str) -> dict[str, float]:
    """The model's ``rollout_state`` series: phase → value."""
    return {
        s.labels["state"]: s.value
        for family in metrics.registry.collect()
        if family.name == "edgefleet_operator_rollout_state"
        for s in family.samples
        if (s.labels["namespace"], s.labels["edgemodel"]) == (namespace, name)
    }


def test_a_build_and_publish_move_reconcile_build_pass_publish_and_rollout_metrics(
    make: Callable[..., EdgeModelReconciler], source: StagedFile
) -> None:
    cpu = device_class(CPU)
    with ThreadPoolExecutor(max_workers=1) as pool:
        reconciler = make(executor=pool)
        metrics = reconciler.metrics
        model = edge_model(source)
        result = reconciler.reconcile(model, [cpu])
    assert [v.version for v in result.status.variants or []] == ["1"]
    assert value(metrics, "edgefleet_operator_reconciles_total", outcome="ok") == 1
    assert value(metrics, "edgefleet_operator_reconcile_duration_seconds_count", outcome="ok") == 1
    assert value(metrics, "edgefleet_operator_reconcile_duration_seconds_sum", outcome="ok") > 0
    built = {"namespace": NAMESPACE, "edgemodel": MODEL, "device_class": CPU, "outcome": "built"}
    assert value(metrics, "edgefleet_operator_build_duration_seconds_count", **built) == 1
    assert value(metrics, "edgefleet_operator_build_duration_seconds_sum", **built) > 0
    # The recipe's one pass, in every candidate the pipeline built from scratch.
    assert value(metrics, "edgefleet_operator_pass_duration_seconds_count", **GRAPH_PASS) >= 1
    assert value(metrics, "edgefleet_operator_publish_duration_seconds_count", outcome="published") == 1
    assert value(metrics, "edgefleet_operator_builds_running", mode="pool") == 0  # all collected
    # No devices yet: the rollout is Pending, one-hot over every phase the controller uses.
    assert one_hot(metrics, NAMESPACE, MODEL) == {phase: float(phase == "Pending") for phase in ROLLOUT_PHASES}
    assert value(metrics, "edgefleet_operator_edgemodels", condition="Published", status="True") == 1
    assert value(metrics, "edgefleet_operator_edgemodels", condition="Stalled", status="False") == 1

    # Again: adopted from the memo, nothing built or published; one more ok reconcile.
    reconciler.reconcile(model.model_copy(update={"status": result.status}), [cpu])
    assert value(metrics, "edgefleet_operator_reconciles_total", outcome="ok") == 2
    assert value(metrics, "edgefleet_operator_build_duration_seconds_count", **built) == 1
    assert value(metrics, "edgefleet_operator_publish_duration_seconds_count", outcome="published") == 1

    # Finalizing takes the model's series away, and it no longer counts among the models.
    reconciler.finalize(model)
    assert one_hot(metrics, NAMESPACE, MODEL) == {}
    assert value(metrics, "edgefleet_operator_edgemodels", condition="Published", status="True") == 0


def test_stalled_requeued_and_error_outcomes(
    make: Callable[..., EdgeModelReconciler], source: StagedFile, store: LocalStore, keys: KeySet
) -> None:
    class FlakyPublisher(Publisher):
        failures = 1

        def publish(self, ref: BundleRef, files: Any, **kwargs: Any) -> PublishedVariant:
            if self.failures:
                self.failures -= 1
                raise StoreUnavailable("the store did not answer")
            return super().publish(ref, files, **kwargs)

    reconciler = make(publisher=FlakyPublisher(store, keys))
    metrics = reconciler.metrics
    cpu = device_class(CPU)
    # A class that does not exist: stalled on the spec.
    reconciler.reconcile(edge_model(source, name="typo", targets={"deviceClasses": ["cpu-nope"]}), [cpu])
    assert value(metrics, "edgefleet_operator_reconciles_total", outcome="stalled") == 1
    assert value(metrics, "edgefleet_operator_edgemodels", condition="Stalled", status="True") == 1
    # The store fails the publish: retried with backoff.
    reconciler.reconcile(edge_model(source), [cpu])
    assert value(metrics, "edgefleet_operator_reconciles_total", outcome="requeued") == 1
    assert value(metrics, "edgefleet_operator_store_errors_total", operation="publish") == 1
    assert value(metrics, "edgefleet_operator_publish_duration_seconds_count", outcome="failed") == 1
    # A build the pipeline refuses is a build too, with its own outcome.
    refusing = make(builder=_refusing)
    refusing.reconcile(edge_model(source, name="refused"), [cpu])
    refused = {"namespace": NAMESPACE, "edgemodel": "refused", "device_class": CPU, "outcome": "refused"}
    assert value(refusing.metrics, "edgefleet_operator_build_duration_seconds_count", **refused) == 1
    assert value(refusing.metrics, "edgefleet_operator_reconciles_total", outcome="stalled") == 1
    # An unexpected failure raises through, and is counted as an error.
    broken = make(builder=_broken)
    with pytest.raises(RuntimeError, match="a bug"):
        broken.reconcile(edge_model(source), [cpu])
    assert value(broken.metrics, "edgefleet_operator_reconciles_total", outcome="error") == 1
    assert value(broken.metrics, "edgefleet_operator_reconciles_total", outcome="ok") == 0
    assert value(broken.metrics, "edgefleet_operator_builds_running", mode="pool") == 0


def _refusing(model: EdgeModel, device_class: DeviceClass, *args: Any, **kwargs: Any) -> Any:
    from edgefleet_operator.reconcile import SpecError

    raise SpecError("spec.accuracy.maxDrop", "no candidate meets the budget")


def _broken(model: EdgeModel, device_class: DeviceClass, *args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a bug")


@dataclass
class OneJob:
    """A dispatcher whose build runs (``Running``) until ``finish`` is set, then hands back a real build."""

    source: StagedFile
    finish: bool = False
    dispatched: list[str] = field(default_factory=list)

    def dispatch(self, model: EdgeModel, device_class: DeviceClass, *, build_key: str, version: str) -> DispatchState:
        self.dispatched.append(device_class.metadata.name)
        if not self.finish:
            return Running(f"job {device_class.metadata.name}: 1 active")
        loaded = load_model(self.source.path)
        return Built(build_variant(model, device_class, loaded, None, cache=None, trainer=None), version)

    def release(self, model: EdgeModel, device_class: DeviceClass, *, build_key: str) -> None:
        pass

    def discard_model(self, model: EdgeModel) -> None:
        pass


def test_builds_running_as_jobs_are_counted_and_their_own_times_recorded(
    make: Callable[..., EdgeModelReconciler], source: StagedFile
) -> None:
    jobs = OneJob(source)
    reconciler = make(dispatcher=jobs)
    metrics = reconciler.metrics
    cpu, other = device_class(CPU), device_class("cpu-other")
    model = edge_model(source, targets={"deviceClasses": [CPU, "cpu-other"]})
    first = reconciler.reconcile(model, [cpu, other])
    assert value(metrics, "edgefleet_operator_builds_running", mode="jobs") == 2
    assert value(metrics, "edgefleet_operator_reconciles_total", outcome="ok") == 1  # building is progress
    jobs.finish = True
    reconciler.reconcile(model.model_copy(update={"status": first.status}), [cpu, other])
    assert value(metrics, "edgefleet_operator_builds_running", mode="jobs") == 0
    # The Job's own time (the summary's buildSeconds) is what the histogram holds.
    built = {"namespace": NAMESPACE, "edgemodel": MODEL, "device_class": CPU, "outcome": "built"}
    assert value(metrics, "edgefleet_operator_build_duration_seconds_count", **built) == 1
    assert value(metrics, "edgefleet_operator_pass_duration_seconds_count", **GRAPH_PASS) >= 2  # one per class
    assert value(metrics, "edgefleet_operator_publish_duration_seconds_count", outcome="published") == 2


def test_the_registry_is_the_operators_own_and_served_over_http(tmp_path: Path) -> None:
    settings = OperatorSettings(store_url=(tmp_path / "s").as_uri(), keys_dir=tmp_path / "k")
    driver = EdgeModelDriver(settings, KopfSettings(metrics_listen="127.0.0.1:0"))
    try:
        driver.metrics.reconciled("ok", 0.25)
        http = _serve_metrics(driver, "127.0.0.1:0")
        try:
            assert driver.metrics_address is not None
            with urllib.request.urlopen(f"http://{driver.metrics_address}/metrics", timeout=10) as response:
                body = response.read().decode()
        finally:
            http.shutdown()
            http.server_close()
    finally:
        driver.close()
    assert 'edgefleet_operator_reconciles_total{outcome="ok"} 1.0' in body
    assert 'edgefleet_operator_reconcile_duration_seconds_bucket{le="0.25",outcome="ok"} 1.0' in body
    assert 'edgefleet_operator_builds_running{mode="jobs"} 0.0' in body
    assert "process_cpu_seconds_total" not in body  # nothing of the process-wide registry
    assert value(OperatorMetrics(), "edgefleet_operator_reconciles_total", outcome="ok") == 0


@pytest.mark.parametrize("address", ["9090", ":9090", "host:", "host:70000", "host:port"])
def test_a_bad_metrics_address_is_refused_naming_the_option(address: str) -> None:
    with pytest.raises(MetricsListenError, match=r"--metrics-listen .* is not HOST:PORT"):
        KopfSettings(metrics_listen=address)
    assert parse_listen("[::]:9090") == ("::", 9090)


def test_an_address_in_use_is_a_clear_error(tmp_path: Path) -> None:
    settings = OperatorSettings(store_url=(tmp_path / "s").as_uri(), keys_dir=tmp_path / "k")
    driver = EdgeModelDriver(settings, KopfSettings())
    first = _serve_metrics(driver, "127.0.0.1:0")
    try:
        with pytest.raises(MetricsListenError, match=r"cannot serve metrics on 127\.0\.0\.1:"):
            _serve_metrics(driver, driver.metrics_address or "")
    finally:
        first.shutdown()
        first.server_close()
        driver.close()


def test_operator_run_help_names_the_metrics_option() -> None:
    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--metrics-listen" in result.output
    assert "off by default" in result.output
