"""The bundle manifest: what a bundle holds, and the sha256 and length of every file once decoded.

The manifest is what gets signed (as a TUF target's custom data or as a target of its own), so it
has one canonical byte form — :meth:`BundleManifest.canonical_json`, sorted keys and no spaces — and
it is parsed once, with a size cap, into typed objects (:func:`parse_manifest`). File names are
plain names (no folders, no ``..``) because a device writes them into its model directory.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from edgefleet_core.bundle.selftest import SelfTest
from edgefleet_core.errors import BundleError
from edgefleet_core.resources.base import DNS_SUBDOMAIN_PATTERN, SHA256_HEX_PATTERN

BUNDLE_API_VERSION: Final = "edgefleet.io/bundle/v1"
MAX_MANIFEST_BYTES: Final = 1 << 20
"""Largest manifest :func:`parse_manifest` reads; lineage and recipe are small, so 1 MiB is generous."""
MAX_FILE_LENGTH: Final = (1 << 31) - 1
"""Largest decoded file: protobuf cannot hold a larger ONNX model (larger ones use external data)."""
"""Largest decoded or encoded file a manifest may declare (16 GiB): the decoder's allocation bound."""
SAFE_FILE_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""A file name without folders: starts with a letter or digit, so never ``.``, ``..`` or hidden."""
VERSION_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"

Codec = Literal["edgefleet-tensors-v1", "zstd", "raw"]
"""How a file travels: our tensor format (codec.py), zstd of the whole file, or the file as is."""
FileRole = Literal["model", "head", "tail"]

Sha256Hex = Annotated[str, StringConstraints(pattern=SHA256_HEX_PATTERN)]
SafeFileName = Annotated[str, StringConstraints(pattern=SAFE_FILE_NAME_PATTERN)]
Length = Annotated[int, Field(ge=0, le=MAX_FILE_LENGTH)]
Version = Annotated[str, StringConstraints(pattern=VERSION_PATTERN)]
DnsName = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
Metric = Annotated[float, Field(allow_inf_nan=False)]


class _ManifestModel(BaseModel):
    """camelCase on the wire, unknown fields refused, immutable (as :class:`ResourceModel`)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, validate_default=True
    )


class ModelRef(_ManifestModel):
    """The EdgeModel this bundle was built from."""

    namespace: DnsName
    name: DnsName


class FileEncoding(_ManifestModel):
    """How one file travels: the encoded payload's name, digest and length, and how to decode it."""

    target: SafeFileName
    """File name of the encoded payload in the bundle (and the TUF target it is published as)."""
    sha256: Sha256Hex
    """sha256 of the encoded payload."""
    length: Length
    """Length in bytes of the encoded payload."""
    codec: Codec
    delta_from: Version | None = None
    """The version whose file this one is a delta against; ``None`` for a self-contained payload."""
    base_sha256: Sha256Hex | None = None
    """sha256 of the decoded base file a delta needs; set exactly when ``delta_from`` is."""

    @model_validator(mode="after")
    def _delta_fields_together(self) -> Self:
        if (self.delta_from is None) != (self.base_sha256 is None):
            raise ValueError("deltaFrom and baseSha256 go together")
        if self.delta_from is not None and self.codec != "edgefleet-tensors-v1":
            raise ValueError("only the edgefleet-tensors-v1 codec carries deltas")
        return self


class BundleFile(_ManifestModel):
    """One model file of the bundle, as the device will hold it once decoded."""

    name: SafeFileName
    role: FileRole
    sha256: Sha256Hex
    """sha256 of the decoded file: what the device checks before activation."""
    length: Length
    """Length in bytes of the decoded file: the decoder's output bound."""
    encoding: FileEncoding


class BundleManifest(_ManifestModel):
    """What a device installs: the model file(s) with their digests, and where they came from."""

    api_version: Literal["edgefleet.io/bundle/v1"] = BUNDLE_API_VERSION
    model: ModelRef
    version: Version
    device_class: DnsName
    variant_id: Sha256Hex
    """Content address of the optimized variant (input digest + canonical recipe + tool versions)."""
    lineage: dict[str, JsonValue]
    recipe: Annotated[list[JsonValue], Field(max_length=256)]
    partition_plan: dict[str, JsonValue] | None = None
    metrics: Annotated[dict[str, Metric], Field(max_length=256)]
    files: Annotated[list[BundleFile], Field(min_length=1, max_length=2)]
    self_test: SelfTest | None = None
    """Golden inputs and outputs the device checks before the version takes traffic; ``None`` in older bundles."""

    @model_validator(mode="after")
    def _finite_numbers(self) -> Self:
        # JSON has no infinity (Python reads 1e400 as one) and canonical_json refuses it: refused
        # here, a signed manifest carrying one fails as a BundleError instead of a ValueError later.
        for name, value in (("lineage", self.lineage), ("recipe", self.recipe), ("partitionPlan", self.partition_plan)):
            if not _all_finite(value):
                raise ValueError(f"{name} holds a number JSON cannot carry (NaN or infinity)")
        return self

    @model_validator(mode="after")
    def _files_consistent(self) -> Self:
        roles = sorted(f.role for f in self.files)
        if roles not in (["model"], ["head", "tail"]):
            raise ValueError(f"files must be one model, or a head and a tail; got roles {roles}")
        names = [f.name for f in self.files] + [f.encoding.target for f in self.files]
        if len(set(names)) != len(names):
            raise ValueError("file names and encoded target names must all differ")
        return self

    def canonical_json(self) -> bytes:
        """The bytes to sign and hash: sorted keys, no spaces, ASCII, every field present.

        Except ``selfTest`` when it is ``None``: fields added later are left out while unset, so a
        manifest published before they existed keeps exactly the bytes it was signed with.
        """
        document = self.model_dump(mode="json", by_alias=True)
        if self.self_test is None:
            del document["selfTest"]
        return json.dumps(
            document,
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
        ).encode("ascii")

    def file(self, name: str) -> BundleFile:
        """The file called ``name``; :class:`BundleError` if the manifest has none."""
        for entry in self.files:
            if entry.name == name:
                return entry
        raise BundleError(f"manifest of {self.model.namespace}/{self.model.name} {self.version} has no file {name!r}")


def _all_finite(value: JsonValue) -> bool:
    """Whether no float anywhere in ``value`` is NaN or infinite (iterative: depth is the sender's choice)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


def parse_manifest(data: bytes, *, max_size: int = MAX_MANIFEST_BYTES) -> BundleManifest:
    """A manifest from its JSON bytes, refusing anything over ``max_size`` or not valid."""
    if len(data) > max_size:
        raise BundleError(f"manifest is {len(data)} bytes, over the {max_size}-byte cap")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BundleError(f"manifest is not JSON: {exc}") from None
    try:
        return BundleManifest.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise BundleError(f"manifest is not valid: {problems}") from None
