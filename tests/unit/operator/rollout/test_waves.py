"""Wave membership: sizes from the policy's cumulative percents, a hash order per model, stable as a class grows."""

from __future__ import annotations

import pytest

from edgefleet_operator.rollout import RolloutInputError, plan_waves, wave_sizes

CANARY = (10, 50, 100)


@pytest.mark.parametrize(
    ("devices", "percents", "sizes"),
    [
        (0, CANARY, (0, 0, 0)),
        (1, CANARY, (1, 1, 1)),
        (3, CANARY, (1, 2, 3)),
        (10, CANARY, (1, 5, 10)),
        (1000, CANARY, (100, 500, 1000)),
        (0, (100,), (0,)),
        (1, (100,), (1,)),
        (3, (100,), (3,)),
        (10, (100,), (10,)),
        (1000, (100,), (1000,)),
        (7, CANARY, (1, 4, 7)),  # ceil(0.7) = 1, ceil(3.5) = 4
        (1000, (7, 29, 57, 100), (70, 290, 570, 1000)),  # float shares would give 71, 290, 570
        (15, (1, 2, 100), (1, 1, 15)),  # at least one device in the first wave
    ],
)
def test_each_wave_is_the_ceiling_of_its_share_and_at_least_one_device(
    devices: int, percents: tuple[int, ...], sizes: tuple[int, ...]
) -> None:
    assert wave_sizes(percents, devices) == sizes
    plan = plan_waves("factory", "digits", [f"cam-{i}" for i in range(devices)], percents)
    assert [len(plan.members(k)) for k in range(1, plan.waves + 1)] == list(sizes)


@pytest.mark.parametrize(("percents", "devices"), [((), 3), ((0, 100), 3), ((50, 101), 3), ((100,), -1)])
def test_impossible_policies_and_counts_are_refused(percents: tuple[int, ...], devices: int) -> None:
    with pytest.raises(RolloutInputError):
        wave_sizes(percents, devices)


def test_the_order_is_deterministic_and_covers_every_device_once() -> None:
    names = [f"cam-{i:03d}" for i in range(50)]
    plan = plan_waves("factory", "digits", names, CANARY)
    assert plan == plan_waves("factory", "digits", reversed(names), CANARY)
    assert sorted(plan.order) == names
    assert plan.order != tuple(names)  # ranked by hash, not by name
    joined = [name for wave in range(1, 4) for name in plan.joining(wave)]
    assert joined == list(plan.order)
    assert [plan.wave_of(name) for name in plan.order] == [1] * 5 + [2] * 20 + [3] * 25


def test_each_model_canaries_on_its_own_devices() -> None:
    names = [f"cam-{i:03d}" for i in range(100)]
    canaries = {model: set(plan_waves("factory", model, names, CANARY).members(1)) for model in ("a", "b", "c")}
    assert canaries["a"] != canaries["b"] != canaries["c"]
    assert plan_waves("lab", "a", names, CANARY).members(1) != plan_waves("factory", "a", names, CANARY).members(1)


@pytest.mark.parametrize("devices", [1, 3, 10, 1000])
def test_a_new_device_does_not_reshuffle_earlier_waves(devices: int) -> None:
    names = [f"cam-{i:04d}" for i in range(devices)]
    before = plan_waves("factory", "digits", names, CANARY)
    for added in ("new-a", "new-b", "new-c"):
        after = plan_waves("factory", "digits", [*names, added], CANARY)
        # The devices already there keep their relative order: the new one is slotted in at its hash.
        assert tuple(name for name in after.order if name != added) == before.order
        for wave in range(1, 4):
            # A wave keeps every member, except that its last may move to a later wave (where it already
            # runs the new version, so nothing is undone).
            left = set(before.members(wave)) - set(after.members(wave))
            assert left <= {before.members(wave)[-1]}


def test_empty_waves_are_skipped() -> None:
    one = plan_waves("factory", "digits", ["cam-0"], CANARY)
    assert one.next_wave_with_devices(1) is None
    two = plan_waves("factory", "digits", ["cam-0", "cam-1"], CANARY)
    assert two.sizes == (1, 1, 2)
    assert two.joining(2) == ()
    assert two.next_wave_with_devices(1) == 3
    with pytest.raises(RolloutInputError, match="outside"):
        two.members(4)
