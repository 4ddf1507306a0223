"""EdgeFleet's custom resources as typed models, and loading them the way the API server would.

The CRDs in ``crds/`` are the contract; these models mirror them field for field.
"""

from edgefleet_core.resources.base import API_GROUP, API_VERSION, GROUP_VERSION, Condition, LabelSelector, ObjectMeta
from edgefleet_core.resources.crds import (
    CustomResourceDefinition,
    apply_defaults,
    custom_resource_definitions,
    schema_problems,
)
from edgefleet_core.resources.device_class import DeviceClass, DeviceClassSpec, DeviceClassStatus
from edgefleet_core.resources.edge_device import EdgeDevice, EdgeDeviceSpec, EdgeDeviceStatus
from edgefleet_core.resources.edge_model import EdgeModel, EdgeModelSpec, EdgeModelStatus
from edgefleet_core.resources.loading import (
    MODELS,
    Resource,
    SourcedDocument,
    load_resources,
    model_problems,
    parse_resource,
    read_documents,
)
from edgefleet_core.resources.recipe import PassSpec, Recipe

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "GROUP_VERSION",
    "MODELS",
    "Condition",
    "CustomResourceDefinition",
    "DeviceClass",
    "DeviceClassSpec",
    "DeviceClassStatus",
    "EdgeDevice",
    "EdgeDeviceSpec",
    "EdgeDeviceStatus",
    "EdgeModel",
    "EdgeModelSpec",
    "EdgeModelStatus",
    "LabelSelector",
    "ObjectMeta",
    "PassSpec",
    "Recipe",
    "Resource",
    "SourcedDocument",
    "apply_defaults",
    "custom_resource_definitions",
    "load_resources",
    "model_problems",
    "parse_resource",
    "read_documents",
    "schema_problems",
]
