"""The rollout controller over a real fleet state: waves, gates, pauses, rollback, restarts, idempotent steps."""

from __future__ import annotations

from collections.abc import Collection
from datetime import timedelta

import pytest

from edgefleet_core.resources.edge_model import ClassRollout
from edgefleet_operator.fleet import FleetState, WaveRef, model_key
from edgefleet_operator.rollout import (
    AssignWave,
    Halt,
    PublishedBundles,
    RollBack,
    RolloutController,
    RolloutInputError,
    RolloutStep,
    StartRollout,
    WavePlan,
    plan_step,
    plan_waves,
)
from tests.unit.operator.rollout.conftest import (
    CPU,
    GPU,
    MODEL,
    NAMESPACE,
    Clock,
    SimulatedFleet,
    Traffic,
    target,
)

TERMINAL = ("Succeeded", "RolledBack", "Failed")
BAD = {"2.0.0": Traffic(errors=10)}


def _reasons(step: RolloutStep) -> list[str]:
    return [d.reason for d in step.decisions]


def _plan(devices: SimulatedFleet, device_class: str = CPU) -> WavePlan:
    return plan_waves(NAMESPACE, MODEL, devices.of_class(device_class), (10, 50, 100))


def _drive(
    controller: RolloutController,
    devices: SimulatedFleet,
    status: ClassRollout | None,
    version: str,
    *,
    fail: Collection[str] = (),
) -> ClassRollout:
    """Step, let the devices act and report, and move the clock to the next requeue, until the rollout ends."""
    for _ in range(30):
        step = controller.step(status, target(version))
        status = step.status
        if status.phase in TERMINAL:
            return status
        devices.act(fail=fail)
        devices.serve()
        devices.clock.now = step.requeue_at or devices.clock.now + timedelta(seconds=10)
    raise AssertionError(f"rollout of {version} did not end: {status}")


def _settle(devices: SimulatedFleet, clock: Clock, traffic: dict[str, Traffic] | None = None) -> None:
    """The devices install what they were assigned and serve through one observation window."""
    devices.act()
    devices.serve(traffic)
    clock.advance(30)
    devices.serve(traffic)


@pytest.fixture
def on_v1(bundles: PublishedBundles, devices: SimulatedFleet, fleet: FleetState, clock: Clock) -> ClassRollout:
    """Ten devices that run 1.0.0 and report healthy, and the status of that finished rollout."""
    names = devices.enroll(10)
    v1 = bundles.resolve(model_namespace=NAMESPACE, model_name=MODEL, device_class=CPU, version="1.0.0")
    fleet.assign(
        NAMESPACE,
        names,
        model_namespace=NAMESPACE,
        model_name=MODEL,
        version="1.0.0",
        action="install",
        target_paths=v1.target_paths,
        bundle_sha256=v1.bundle_sha256,
        bundle_length=v1.bundle_length,
    )
    devices.act()
    devices.serve()
    clock.advance(600)
    return ClassRollout(
        device_class=CPU, version="1.0.0", phase="Succeeded", wave=3, waves=3, devices=10, updated=10, healthy=10
    )


def test_a_first_rollout_reaches_succeeded_with_nothing_to_roll_back_to(
    controller: RolloutController, devices: SimulatedFleet, fleet: FleetState
) -> None:
    devices.enroll(10)
    status = _drive(controller, devices, None, "1.0.0")
    assert (status.phase, status.updated, status.healthy, status.previous_version) == ("Succeeded", 10, 10, None)
    assert {devices.assigned(name) for name in devices.of_class(CPU)} == {("install", "1.0.0")}
    assert fleet.head_revision() == 3  # one revision per wave


def _at_wave_2(
    controller: RolloutController, devices: SimulatedFleet, clock: Clock, status: ClassRollout
) -> ClassRollout:
    """2.0.0 assigned to waves 1 and 2 (5 devices), wave 1 healthy."""
    status = controller.step(status, target("2.0.0")).status
    _settle(devices, clock)
    status = controller.step(status, target("2.0.0")).status
    clock.advance(60)
    step = controller.step(status, target("2.0.0"))
    assert _reasons(step) == ["WaveAssigned", "AwaitingInstalls"]
    return step.status


def test_a_rollout_goes_wave_by_wave_through_its_gates_to_succeeded(
    controller: RolloutController, devices: SimulatedFleet, fleet: FleetState, clock: Clock, on_v1: ClassRollout
) -> None:
    plan = _plan(devices)
    head = fleet.head_revision()

    step = controller.step(on_v1, target("2.0.0"))
    assert _reasons(step) == ["RolloutStarted", "WaveAssigned", "AwaitingInstalls"]
    assert step.decisions[0].action == StartRollout(previous_version="1.0.0", replaced_version=None)
    assert step.decisions[1].action == AssignWave(1, WaveRef(index=0, count=3, percent=10), "2.0.0", plan.joining(1))
    assert step.revisions == (head + 1,)
    status = step.status
    assert (status.phase, status.version, status.previous_version) == ("Progressing", "2.0.0", "1.0.0")
    assert (status.wave, status.waves, status.devices, status.updated) == (1, 3, 10, 1)
    assert status.last_transition_time == clock.now
    assert {devices.assigned(name) for name in plan.joining(2) + plan.joining(3)} == {("install", "1.0.0")}

    # Nothing changed: nothing is assigned again, the HEAD revision stays, the status is the same.
    again = controller.step(status, target("2.0.0"))
    assert (again.revisions, again.status, fleet.head_revision()) == ((), status, head + 1)

    devices.act()
    devices.serve()
    step = controller.step(status, target("2.0.0"))
    assert _reasons(step) == ["ObservationWindow"]
    assert step.requeue_at == clock.now + timedelta(seconds=30)

    clock.advance(30)
    devices.serve()
    step = controller.step(step.status, target("2.0.0"))
    assert _reasons(step) == ["WaveHealthy", "WavePause"]
    assert (step.status.wave, step.revisions, step.requeue_at) == (2, (), clock.now + timedelta(seconds=60))
    assert controller.step(step.status, target("2.0.0")).revisions == ()

    for wave, percent in ((2, 50), (3, 100)):
        clock.advance(60)
        step = controller.step(step.status, target("2.0.0"))
        assert _reasons(step) == ["WaveAssigned", "AwaitingInstalls"]
        assert step.decisions[0].action == AssignWave(
            wave, WaveRef(index=wave - 1, count=3, percent=percent), "2.0.0", plan.joining(wave)
        )
        _settle(devices, clock)
        step = controller.step(step.status, target("2.0.0"))

    assert _reasons(step) == ["RolloutSucceeded", "RolloutSucceeded"]
    status = step.status
    assert (status.phase, status.wave, status.updated, status.healthy, status.failed) == ("Succeeded", 3, 10, 10, 0)
    assert status.message is not None
    assert status.message == (
        "all 3 wave(s) healthy: 10 of 10 install(s) succeeded; error rate 0.0000 (maximum 0.0200); "
        "10 of 10 reporting device(s) healthy"
    )
    # Every install is attributable to its wave.
    for name in plan.order:
        record = fleet.assignments_for(NAMESPACE, name).assignments[model_key(NAMESPACE, MODEL)]
        assert (record.action, record.version) == ("install", "2.0.0")
        assert record.wave == WaveRef(
            index=plan.wave_of(name) - 1, count=3, percent=(10, 50, 100)[plan.wave_of(name) - 1]
        )
    head = fleet.head_revision()
    assert controller.step(status, target("2.0.0")).status == status
    assert fleet.head_revision() == head


def test_an_unhealthy_wave_rolls_exactly_the_updated_devices_back(
    controller: RolloutController,
    bundles: PublishedBundles,
    devices: SimulatedFleet,
    fleet: FleetState,
    clock: Clock,
    on_v1: ClassRollout,
) -> None:
    plan = _plan(devices)
    status = _at_wave_2(controller, devices, clock, on_v1)
    untouched = {name: devices.assignment(name) for name in plan.joining(3)}
    _settle(devices, clock, BAD)
    head = fleet.head_revision()

    step = controller.step(status, target("2.0.0"))
    assert _reasons(step) == ["ErrorRateHigh", "RolledBack"]
    rollback = step.decisions[0].action
    assert isinstance(rollback, RollBack)
    assert (rollback.version, rollback.devices) == ("1.0.0", tuple(sorted(plan.members(2))))
    assert step.revisions == (head + 1,)
    v1 = bundles.resolve(model_namespace=NAMESPACE, model_name=MODEL, device_class=CPU, version="1.0.0")
    for name in plan.members(2):
        record = fleet.assignments_for(NAMESPACE, name).assignments[model_key(NAMESPACE, MODEL)]
        assert (record.action, record.version, record.revision, record.wave) == ("rollback", "1.0.0", head + 1, None)
        assert (record.target_paths, record.bundle_sha256) == (v1.target_paths, v1.bundle_sha256)
    assert {name: devices.assignment(name) for name in plan.joining(3)} == untouched

    status = step.status
    assert (status.phase, status.version, status.previous_version) == ("RolledBack", "2.0.0", "1.0.0")
    assert (status.wave, status.updated, status.rolled_back) == (2, 5, 5)
    # 1 canary × 2 healthy + 2 bad windows, 4 devices × 2 bad windows: 100 errors in 1200 inferences.
    assert status.message is not None
    assert status.message.startswith(
        "wave 2 of 3 failed its health gate (ErrorRateHigh): error rate 0.0833 (100 of 1200 inferences on 5 device(s))"
        " is above the maximum 0.0200"
    )
    assert status.message.endswith("; rolled back 5 device(s) to 1.0.0")

    # The devices go back; the rollout stays rolled back and assigns nothing more.
    devices.act()
    clock.advance(600)
    again = controller.step(status, target("2.0.0"))
    assert (_reasons(again), again.revisions, again.status) == (["RolledBack"], (), status)


def test_failed_installs_roll_back_without_waiting_for_the_window(
    controller: RolloutController, devices: SimulatedFleet, clock: Clock, on_v1: ClassRollout
) -> None:
    canary = _plan(devices).joining(1)
    status = controller.step(on_v1, target("2.0.0")).status
    devices.act(fail=canary)
    step = controller.step(status, target("2.0.0"))
    assert _reasons(step) == ["InstallsFailed", "RolledBack"]
    assert step.status.failed == 1
    assert step.status.message is not None
    assert (
        "installs failed on 1 of 1 updated device(s): success ratio at most 0.00, minimum 0.90" in step.status.message
    )


def test_a_gate_failing_during_the_pause_rolls_back_before_the_next_wave(
    controller: RolloutController, devices: SimulatedFleet, fleet: FleetState, clock: Clock, on_v1: ClassRollout
) -> None:
    canary = _plan(devices).joining(1)
    status = controller.step(on_v1, target("2.0.0")).status
    _settle(devices, clock)
    step = controller.step(status, target("2.0.0"))
    assert _reasons(step) == ["WaveHealthy", "WavePause"]
    clock.advance(20)
    devices.serve(BAD)
    devices.serve(BAD)
    devices.serve(BAD)
    step = controller.step(step.status, target("2.0.0"))
    assert _reasons(step) == ["ErrorRateHigh", "RolledBack"]
    rollback = step.decisions[0].action
    assert isinstance(rollback, RollBack)
    assert (rollback.version, rollback.devices) == ("1.0.0", canary)
    assert step.status.phase == "RolledBack"


def test_a_first_rollout_that_fails_stops_without_a_rollback(
    controller: RolloutController, devices: SimulatedFleet, fleet: FleetState, clock: Clock
) -> None:
    devices.enroll(3)
    status = controller.step(None, target("1.0.0")).status
    _settle(devices, clock, {"1.0.0": Traffic(errors=50)})
    head = fleet.head_revision()
    step = controller.step(status, target("1.0.0"))
    assert _reasons(step) == ["ErrorRateHigh", "RolloutFailed"]
    assert isinstance(step.decisions[0].action, Halt)
    assert (step.revisions, fleet.head_revision()) == ((), head)
    assert (step.status.phase, step.status.previous_version, step.status.updated) == ("Failed", None, 1)
    assert step.status.message is not None
    assert step.status.message.endswith("not rolled back: there is no previous version in this class")


def test_without_auto_rollback_a_failed_gate_stops_and_leaves_the_devices(
    controller: RolloutController, devices: SimulatedFleet, fleet: FleetState, clock: Clock, on_v1: ClassRollout
) -> None:
    status = controller.step(on_v1, target("2.0.0", auto_rollback=False)).status
    _settle(devices, clock, BAD)
    head = fleet.head_revision()
    step = controller.step(status, target("2.0.0", auto_rollback=False))
    assert (_reasons(step), step.status.phase, fleet.head_revision()) == (
        ["ErrorRateHigh", "RolloutFailed"],
        "Failed",
        head,
    )
    assert step.status.message is not None
    assert step.status.message.endswith("not rolled back: autoRollback is off")


def test_spec_paused_holds_the_rollout_and_resuming_observes_again(
    controller: RolloutController, devices: SimulatedFleet, fleet: FleetState, clock: Clock, on_v1: ClassRollout
) -> None:
    status = controller.step(on_v1, target("2.0.0")).status
    _settle(devices, clock)
    head = fleet.head_revision()

    step = controller.step(status, target("2.0.0", paused=True))
    assert _reasons(step) == ["RolloutPaused", "RolloutPaused"]
    assert (step.status.phase, step.status.wave, step.status.message) == (
        "Paused",
        1,
        "paused at wave 1 of 3 (spec.paused)",
    )
    assert step.status.last_transition_time == clock.now
    clock.advance(600)
    devices.serve()
    still = controller.step(step.status, target("2.0.0", paused=True))
    assert (_reasons(still), still.status, fleet.head_revision()) == (["RolloutPaused"], step.status, head)

    # Nobody watched while paused: the window runs again from the resume before the wave may pass.
    resumed = controller.step(still.status, target("2.0.0"))
    assert _reasons(resumed) == ["RolloutResumed", "ObservationWindow"]
    assert (resumed.status.phase, resumed.requeue_at) == ("Progressing", clock.now + timedelta(seconds=30))
    clock.advance(30)
    assert _reasons(controller.step(resumed.status, target("2.0.0"))) == ["WaveHealthy", "WavePause"]


def test_a_new_version_while_paused_starts_nothing(
    controller: RolloutController, devices: SimulatedFleet, fleet: FleetState, on_v1: ClassRollout
) -> None:
    head = fleet.head_revision()
    step = controller.step(on_v1, target("2.0.0", paused=True))
    assert _reasons(step) == ["RolloutStarted", "RolloutPaused", "RolloutPaused"]
    assert (step.status.phase, step.status.version, step.status.previous_version) == ("Paused", "2.0.0", "1.0.0")
    assert fleet.head_revision() == head


def test_a_new_version_mid_rollout_restarts_at_wave_1_keeping_the_rollback_target(
    controller: RolloutController, devices: SimulatedFleet, fleet: FleetState, clock: Clock, on_v1: ClassRollout
) -> None:
    plan = _plan(devices)
    status = _at_wave_2(controller, devices, clock, on_v1)
    devices.act()

    step = controller.step(status, target("3.0.0"))
    assert _reasons(step) == ["RolloutRestarted", "WaveAssigned", "AwaitingInstalls"]
    assert step.decisions[0].action == StartRollout(previous_version="1.0.0", replaced_version="2.0.0")
    assert step.decisions[1].action == AssignWave(1, WaveRef(index=0, count=3, percent=10), "3.0.0", plan.joining(1))
    status = step.status
    assert (status.version, status.previous_version, status.wave, status.updated) == ("3.0.0", "1.0.0", 1, 1)
    assert step.decisions[0].status.message == (
        "rolling out 3.0.0 from wave 1, replacing the rollout of 2.0.0 (Progressing at wave 2); rollback target 1.0.0"
    )
    assert {devices.assigned(name) for name in plan.joining(2)} == {("install", "2.0.0")}

    # 3.0.0 fails: every device off the last good version goes back, 2.0.0's too.
    _settle(devices, clock, {"3.0.0": Traffic(errors=20)})
    step = controller.step(status, target("3.0.0"))
    assert _reasons(step) == ["ErrorRateHigh", "RolledBack"]
    rollback = step.decisions[0].action
    assert isinstance(rollback, RollBack)
    assert rollback.devices == tuple(sorted(plan.members(2)))


def test_a_rollback_that_missed_devices_is_applied_to_them(
    controller: RolloutController,
    bundles: PublishedBundles,
    devices: SimulatedFleet,
    fleet: FleetState,
    clock: Clock,
    on_v1: ClassRollout,
) -> None:
    canary = _plan(devices).joining(1)
    status = controller.step(on_v1, target("2.0.0")).status
    _settle(devices, clock, BAD)
    status = controller.step(status, target("2.0.0")).status
    assert status.phase == "RolledBack"
    # As if an interrupted step had left the canary with its 2.0.0 assignment.
    v2 = bundles.resolve(model_namespace=NAMESPACE, model_name=MODEL, device_class=CPU, version="2.0.0")
    fleet.assign(
        NAMESPACE,
        canary,
        model_namespace=NAMESPACE,
        model_name=MODEL,
        version="2.0.0",
        action="install",
        target_paths=v2.target_paths,
        bundle_sha256=v2.bundle_sha256,
        bundle_length=v2.bundle_length,
    )
    step = controller.step(status, target("2.0.0"))
    assert _reasons(step) == ["RolledBack", "RolledBack"]
    assert step.decisions[0].action == RollBack("1.0.0", canary, None)
    assert devices.assigned(canary[0]) == ("rollback", "1.0.0")


def test_a_class_without_devices_waits_then_new_devices_catch_up(
    controller: RolloutController, devices: SimulatedFleet, fleet: FleetState, clock: Clock
) -> None:
    step = controller.step(None, target("1.0.0"))
    assert _reasons(step) == ["RolloutStarted", "NoDevices"]
    assert (step.status.phase, step.status.devices, step.revisions) == ("Pending", 0, ())

    [first] = devices.enroll(1)
    step = controller.step(step.status, target("1.0.0"))
    assert _reasons(step) == ["WaveAssigned", "AwaitingInstalls"]
    assert step.decisions[0].action == AssignWave(1, WaveRef(index=0, count=3, percent=10), "1.0.0", (first,))
    _settle(devices, clock)
    # One device: waves 2 and 3 add nobody, so wave 1's gate ends the rollout.
    step = controller.step(step.status, target("1.0.0"))
    assert _reasons(step) == ["RolloutSucceeded", "RolloutSucceeded"]

    devices.enroll(2)
    late = tuple(name for name in _plan(devices).order if name != first)  # in rollout order
    step = controller.step(step.status, target("1.0.0"))
    assert _reasons(step) == ["DevicesCaughtUp", "RolloutSucceeded"]
    assert step.decisions[0].action == AssignWave(3, WaveRef(index=2, count=3, percent=100), "1.0.0", late)
    assert (step.status.phase, step.status.devices, step.status.updated) == ("Succeeded", 3, 3)


def test_rollouts_of_two_classes_are_independent(
    controller: RolloutController, devices: SimulatedFleet, fleet: FleetState, clock: Clock
) -> None:
    cpu = devices.enroll(4)
    gpu = devices.enroll(2, GPU, prefix="gpu")
    cpu_step = controller.step(None, target("1.0.0"))
    assert [devices.assignment(name) for name in gpu] == [None, None]
    before = {name: devices.assignment(name) for name in cpu}
    gpu_step = controller.step(None, target("1.0.0", device_class=GPU))
    assert {name: devices.assignment(name) for name in cpu} == before
    assert gpu_step.decisions[1].action == AssignWave(
        1, WaveRef(index=0, count=3, percent=10), "1.0.0", _plan(devices, GPU).joining(1)
    )
    assert (cpu_step.status.device_class, cpu_step.status.devices) == (CPU, 4)
    assert (gpu_step.status.device_class, gpu_step.status.devices) == (GPU, 2)


def test_without_a_status_the_rollback_target_is_read_from_the_fleet(
    controller: RolloutController, on_v1: ClassRollout
) -> None:
    decision = controller.plan(None, target("2.0.0"))
    assert decision.action == StartRollout(previous_version="1.0.0", replaced_version=None)


def test_a_naive_clock_or_another_class_status_is_refused(
    controller: RolloutController, devices: SimulatedFleet, clock: Clock, on_v1: ClassRollout
) -> None:
    snapshot = controller.snapshot(target("2.0.0"))
    with pytest.raises(RolloutInputError, match="naive"):
        plan_step(on_v1, target("2.0.0"), snapshot, clock.now.replace(tzinfo=None))
    with pytest.raises(RolloutInputError, match="class cpu-small passed for class gpu-large"):
        plan_step(on_v1, target("2.0.0", device_class=GPU), snapshot, clock.now)


def test_a_device_whose_clock_lags_does_not_cut_the_observation_window_short(
    controller: RolloutController, devices: SimulatedFleet, clock: Clock, on_v1: ClassRollout
) -> None:
    step = controller.step(on_v1, target("2.0.0"))
    started = clock.now
    clock.advance(-3600)  # the canary stamps its report an hour early
    devices.act()
    clock.now = started + timedelta(seconds=5)
    devices.serve()
    step = controller.step(step.status, target("2.0.0"))
    assert _reasons(step) == ["ObservationWindow"]
    assert step.requeue_at == started + timedelta(seconds=30)  # from when the wave started, not the stamp
