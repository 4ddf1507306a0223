"""Non-finite numbers in a manifest's free-form fields: refused when parsed, not a ValueError when signed.

Found by the manifest fuzz target (tests/reliability/test_fuzz_manifest.py): JSON reads ``1e400``
as infinity, which ``lineage``, ``recipe`` and ``partitionPlan`` accepted; ``canonical_json`` then
raised ``ValueError`` (JSON cannot carry it), so a device or the publisher crashed instead of
refusing the manifest.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from edgefleet_core.bundle.manifest import BundleManifest, parse_manifest
from edgefleet_core.errors import BundleError


def _document(**changes: Any) -> dict[str, Any]:
    encoding = {"target": "model.onnx.eft", "sha256": "34" * 32, "length": 10, "codec": "zstd"}
    document: dict[str, Any] = {
        "model": {"namespace": "vision", "name": "digits"},
        "version": "1.0.0",
        "deviceClass": "cpu-small",
        "variantId": "ab" * 32,
        "lineage": {},
        "recipe": [],
        "metrics": {},
        "files": [{"name": "model.onnx", "role": "model", "sha256": "12" * 32, "length": 20, "encoding": encoding}],
    }
    document.update(changes)
    return document


@pytest.mark.parametrize(
    "changes",
    [
        {"lineage": {"score": 1e400}},
        {"recipe": [{"type": "WeightClustering", "weightClustering": {"bits": 1e400}}]},
        {"partitionPlan": {"candidates": [{"headMs": -1e400}]}},
        {"lineage": {"deep": [[[{"x": 1e400}]]]}},
    ],
)
def test_infinity_anywhere_in_free_form_fields_is_a_bundle_error(changes: dict[str, Any]) -> None:
    text = json.dumps(_document(**changes)).replace("Infinity", "1e400")
    with pytest.raises(BundleError, match="NaN or infinity"):
        parse_manifest(text.encode())


def test_a_manifest_built_in_code_refuses_infinity_before_it_is_signed() -> None:
    with pytest.raises(ValidationError, match="NaN or infinity"):
        BundleManifest.model_validate(_document(lineage={"score": float("nan")}))


def test_finite_free_form_fields_still_round_trip() -> None:
    manifest = parse_manifest(json.dumps(_document(lineage={"score": 1e300, "n": 10**30})).encode())
    assert parse_manifest(manifest.canonical_json()) == manifest
