"""The fleet's shared state in the artifact store: bootstrap tokens, devices, assignments, health.

Gateways are stateless: everything a replica needs is in the store under ``fleet/``
(:mod:`.state`, records in :mod:`.records`); the control plane resolves what an assignment names
from the signed TUF repository beside it (:mod:`.bundles`).
"""

from edgefleet_operator.fleet.bundles import ResolvedBundle, resolve_bundle
from edgefleet_operator.fleet.errors import (
    BundleNotPublished,
    FleetError,
    FleetInputError,
    FleetRecordError,
    TokenRefused,
    UnknownDevice,
)
from edgefleet_operator.fleet.records import (
    AssignmentChange,
    AssignmentRecord,
    BootstrapToken,
    DeviceAssignments,
    DeviceHealthRecord,
    DeviceRecord,
    HealthAggregate,
    HealthWindow,
    InstallRecord,
    ModelTotals,
    ModelWindow,
    ReplicaHealth,
    TokenUse,
    WaveRef,
    device_id,
    model_key,
    totals_key,
)
from edgefleet_operator.fleet.state import FleetState

__all__ = [
    "AssignmentChange",
    "AssignmentRecord",
    "BootstrapToken",
    "BundleNotPublished",
    "DeviceAssignments",
    "DeviceHealthRecord",
    "DeviceRecord",
    "FleetError",
    "FleetInputError",
    "FleetRecordError",
    "FleetState",
    "HealthAggregate",
    "HealthWindow",
    "InstallRecord",
    "ModelTotals",
    "ModelWindow",
    "ReplicaHealth",
    "ResolvedBundle",
    "TokenRefused",
    "TokenUse",
    "UnknownDevice",
    "WaveRef",
    "device_id",
    "model_key",
    "resolve_bundle",
    "totals_key",
]
