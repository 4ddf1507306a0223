"""The seam between the reconciler and builds that run somewhere else (one Kubernetes Job per class).

With a :class:`BuildDispatcher`, a class whose build key has nothing published is handed to the
dispatcher instead of being built in the reconciler's worker pool. The dispatcher only *builds*:
it hands back the built variant (:class:`Built`) and the reconciler signs and publishes it, exactly
as for an in-process build. Publishing stays with the one operator that holds the publish lock
because the signed repository takes one writer at a time (its targets, snapshot and timestamp are
read-modify-write, and stores offer no compare-and-swap); the pipeline is what is heavy and scales out.

:meth:`BuildDispatcher.dispatch` is level-triggered and idempotent: called again with the same build
key it starts nothing new and reports how that build is doing. Nothing here knows Kubernetes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import EdgeModel
from edgefleet_operator.reconcile.errors import SpecError, TransientError
from edgefleet_operator.reconcile.variants import BuiltVariant


@dataclass(frozen=True)
class Running:
    """The build was started (now or earlier) and has not finished."""

    message: str
    """Where it runs, for the status (``job vision/ef-digits-cpu-...: 1 active``)."""


@dataclass(frozen=True)
class Built:
    """The build finished: the variant is ready to publish."""

    variant: BuiltVariant
    version: str
    """The version the build was dispatched for: classes dispatched together share it."""


@dataclass(frozen=True)
class Failed:
    """The build ended without a variant.

    A :class:`SpecError` is final for this build key (the pipeline is deterministic in its inputs);
    a :class:`TransientError` means the next dispatch starts the build afresh.
    """

    error: SpecError | TransientError


DispatchState = Running | Built | Failed


class BuildDispatcher(Protocol):
    """Runs class builds away from the reconciler (:class:`~edgefleet_operator.jobs.dispatcher.KubeJobDispatcher`)."""

    def dispatch(self, model: EdgeModel, device_class: DeviceClass, *, build_key: str, version: str) -> DispatchState:
        """Start the build of ``build_key`` unless it is under way or done; how it stands now.

        Raises :class:`~edgefleet_core.errors.EdgeFleetError` when the dispatcher itself cannot be
        reached (the API server, the store): the reconciler retries with backoff.
        """
        ...

    def release(self, model: EdgeModel, device_class: DeviceClass, *, build_key: str) -> None:
        """Forget a build whose variant is published now (its staged output is no longer needed)."""
        ...

    def discard_model(self, model: EdgeModel) -> None:
        """Drop every build of ``model`` (it is being deleted): staged outputs, and runs nothing else cleans up."""
        ...
