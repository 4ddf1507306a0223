"""Reconciling EdgeModels: from a spec to published, signed variants per DeviceClass and a status.

Transport-free: the kopf handlers and the embedded control plane (``edgefleet up``) call the same
code. Layers:

- :mod:`.targets`: which DeviceClasses a model targets;
- :mod:`.sources`: the source model and evaluation data, read and verified against their sha256;
- :mod:`.build_key`: the content address of a variant's build inputs (adoption after a restart);
- :mod:`.variants`: one variant built (optimize, partition, self-test) and its status entry;
- :mod:`.status`: the Kubernetes-convention conditions;
- :mod:`.errors`: :class:`SpecError` (the user must act: ``Stalled``) and :class:`TransientError` (retry);
- :mod:`.edge_model`: :class:`EdgeModelReconciler`, which ties them together with the rollout controller.
"""

from edgefleet_operator.reconcile.build_key import (
    build_inputs,
    build_key,
    effective_partition,
    effective_recipe,
    pinned_data_sha256,
    recipe_field,
)

# Last: it builds on every module above.
from edgefleet_operator.reconcile.edge_model import EdgeModelReconciler, Event, ReconcileResult, VariantBuilder
from edgefleet_operator.reconcile.errors import ReconcileError, SpecError, TransientError
from edgefleet_operator.reconcile.sources import SourceResolver
from edgefleet_operator.reconcile.status import (
    CONDITION_TYPES,
    DEGRADED,
    OPTIMIZED,
    PUBLISHED,
    READY,
    RECONCILING,
    ROLLED_OUT,
    STALLED,
    StatusReason,
    find_condition,
    is_true,
    set_condition,
    summarize,
)
from edgefleet_operator.reconcile.targets import resolve_targets, targets_class
from edgefleet_operator.reconcile.variants import BuiltVariant, build_variant, variant_status

__all__ = [
    "CONDITION_TYPES",
    "DEGRADED",
    "OPTIMIZED",
    "PUBLISHED",
    "READY",
    "RECONCILING",
    "ROLLED_OUT",
    "STALLED",
    "BuiltVariant",
    "EdgeModelReconciler",
    "Event",
    "ReconcileError",
    "ReconcileResult",
    "SourceResolver",
    "SpecError",
    "StatusReason",
    "TransientError",
    "VariantBuilder",
    "build_inputs",
    "build_key",
    "build_variant",
    "effective_partition",
    "effective_recipe",
    "find_condition",
    "is_true",
    "pinned_data_sha256",
    "recipe_field",
    "resolve_targets",
    "set_condition",
    "summarize",
    "targets_class",
    "variant_status",
]
