"""Which devices of a class belong to which rollout wave.

Devices are ranked by a hash of the model and the device, not by name: each model then canaries on
its own slice of the class (a name-sorted order would put the same few devices first for every
model), and the ranking of the devices already there never changes when one enrolls — a new device
is slotted in at its hash, so earlier waves keep their members (at most the last member of a wave
moves to the next one, where it is already updated).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from edgefleet_operator.rollout.errors import RolloutInputError


def rollout_rank(model_namespace: str, model_name: str, device_name: str) -> str:
    """The device's place in the rollout order of one model: full sha256 hex, compared as a string."""
    # NUL separates the parts, which DNS names cannot contain, so no two (model, device) pairs share a key.
    return hashlib.sha256(f"{model_namespace}/{model_name}\0{device_name}".encode()).hexdigest()


def wave_sizes(percents: Sequence[int], devices: int) -> tuple[int, ...]:
    """Cumulative device counts after each wave: ``ceil(percent × devices / 100)``, at least 1 when any.

    ``percents`` are the policy's cumulative percents (strictly increasing, the last 100).
    """
    if devices < 0:
        raise RolloutInputError(f"a class cannot hold {devices} devices")
    if not percents or any(not 1 <= p <= 100 for p in percents):
        raise RolloutInputError(f"wave percents must be 1..100, at least one: {list(percents)}")
    # Integer ceiling: a share computed in floats lands beside whole numbers (7 / 100 × 100 is
    # 7.000000000000001), and ceil would then take one device too many.
    return tuple(min(devices, max(1 if devices else 0, -(-percent * devices // 100))) for percent in percents)


@dataclass(frozen=True)
class WavePlan:
    """A class's devices in rollout order and where each wave ends."""

    order: tuple[str, ...]
    """Device names, canary first."""
    sizes: tuple[int, ...]
    """Cumulative count of devices after each wave (``sizes[k - 1]`` for wave ``k``)."""

    @property
    def waves(self) -> int:
        """How many waves the policy has."""
        return len(self.sizes)

    def members(self, wave: int) -> tuple[str, ...]:
        """The devices of waves 1..``wave`` (cumulative); wave 0 is nobody."""
        if not 0 <= wave <= self.waves:
            raise RolloutInputError(f"wave {wave} is outside 0..{self.waves}")
        return self.order[: self.sizes[wave - 1]] if wave else ()

    def joining(self, wave: int) -> tuple[str, ...]:
        """The devices that wave ``wave`` adds to the ones before it."""
        before = self.sizes[wave - 2] if wave > 1 else 0
        return self.members(wave)[before:]

    def next_wave_with_devices(self, wave: int) -> int | None:
        """The first wave after ``wave`` that adds devices; ``None`` when every later wave is empty.

        Small classes have empty waves (3 devices, 10 % / 50 % / 100 %: 1, 2, 3 — but 1 device: 1, 1, 1);
        stepping through them would only repeat the last gate.
        """
        for later in range(wave + 1, self.waves + 1):
            if self.joining(later):
                return later
        return None

    def wave_of(self, device_name: str) -> int:
        """The wave a device joins in (1-based)."""
        position = self.order.index(device_name)
        return next(k for k, size in enumerate(self.sizes, start=1) if position < size)


def plan_waves(model_namespace: str, model_name: str, device_names: Iterable[str], percents: Sequence[int]) -> WavePlan:
    """The wave plan of one model over one class's devices (names within the model's namespace)."""
    names = sorted(set(device_names))
    order = sorted(names, key=lambda name: (rollout_rank(model_namespace, model_name, name), name))
    return WavePlan(order=tuple(order), sizes=wave_sizes(percents, len(order)))
