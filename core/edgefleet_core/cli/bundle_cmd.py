"""``edgefleet publish`` and ``edgefleet fetch``: signed bundles in and out of an artifact store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgefleet_core.errors import EdgeFleetError

if TYPE_CHECKING:
    import onnx

    from edgefleet_core.bundle.distribution import BuiltBundle
    from edgefleet_core.bundle.selftest import SelfTest

Store = Annotated[str, typer.Option("--store", help="file:///absolute/path or s3://bucket or s3://bucket/prefix.")]
Endpoint = Annotated[
    str | None, typer.Option(help="S3 endpoint (http://host:port); default AWS_ENDPOINT_URL or MINIO_ENDPOINT.")
]
AccessKey = Annotated[str | None, typer.Option(help="S3 access key; default AWS_ACCESS_KEY_ID or MINIO_ACCESS_KEY.")]
SecretKey = Annotated[
    str | None, typer.Option(help="S3 secret key; default AWS_SECRET_ACCESS_KEY or MINIO_SECRET_KEY.")
]
Namespace = Annotated[str, typer.Option(help="Namespace of the EdgeModel.")]
# Shared with the operator's commands (operator run, pipeline-job), so every S3 option reads alike.
Region = Annotated[str | None, typer.Option(help="S3 region; default AWS_REGION.")]
CacheDir = Annotated[Path | None, typer.Option("--cache-dir", help="Cache of optimized variants (default: no cache).")]
MAX_REPORT_BYTES = 16 * 1024 * 1024
MAX_GOLDEN_BYTES = 1024 * 1024
"""Sample inputs go into the signed manifest, which caps the self-test at 64 KiB; 1 MiB of NPZ is plenty."""
MAX_PLAN_BYTES = 1024 * 1024
"""A partition plan is a few KiB per candidate; it goes into the signed manifest."""


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=1)


def _report_facts(report: Path | None, files: dict[str, bytes]) -> dict[str, Any]:
    """Variant id, lineage, recipe and metrics from an `edgefleet optimize` report, or from the files."""
    if report is None:
        digests = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
        # Without a pipeline report the content address is that of the files themselves.
        variant = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
        return {"variant_id": variant, "lineage": {"files": digests}, "recipe": [], "metrics": {}}
    if report.stat().st_size > MAX_REPORT_BYTES:
        raise EdgeFleetError(f"{report}: report is over {MAX_REPORT_BYTES} bytes")
    try:
        body = json.loads(report.read_text(encoding="utf-8"))
        chosen = next(c for c in body["candidates"] if c["name"] == body["chosen"])
        evaluation = chosen["evaluation"]
        metrics = {
            "accuracy": evaluation["metric_value"],
            "accuracyDelta": evaluation["accuracy_delta"],
            "sizeBytes": evaluation["size_bytes"],
        }
        for key, value in (("p50Ms", evaluation["latency"]["p50_ms"]), ("p95Ms", evaluation["latency"]["p95_ms"])):
            if value is not None:
                metrics[key] = value
        return {
            "variant_id": chosen["variantId"],
            "lineage": chosen["lineage"],
            "recipe": chosen["recipe"],
            "metrics": metrics,
        }
    except (ValueError, KeyError, TypeError, StopIteration) as exc:
        raise EdgeFleetError(f"{report}: not an edgefleet optimize report ({type(exc).__name__}: {exc})") from None


def _self_test(files: dict[str, bytes], golden_data: Path | None, latency_slo_ms: float | None) -> SelfTest:
    """The manifest's self-test: the files run on ONNX Runtime CPU on sample (or generated) inputs."""
    import zipfile

    import numpy as np

    from edgefleet_core.bundle.selftest import make_self_test

    inputs = None
    if golden_data is not None:
        if golden_data.stat().st_size > MAX_GOLDEN_BYTES:
            raise EdgeFleetError(f"{golden_data}: golden data is over {MAX_GOLDEN_BYTES} bytes")
        try:
            with np.load(golden_data, allow_pickle=False) as archive:
                inputs = {name: archive[name] for name in archive.files}
        except (ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:
            raise EdgeFleetError(f"{golden_data}: not an NPZ of input arrays ({exc})") from None
    return make_self_test(files, inputs=inputs, latency_slo_ms=latency_slo_ms)


def _check_files(names: list[str], partition_plan: Path | None) -> None:
    """The files a bundle may carry, and a plan exactly when they are a head and a tail."""
    if len(set(names)) != len(names):
        raise _fail(f"two files share a name: {sorted(names)}; a bundle holds each of its files once")
    if sorted(names) not in (["model.onnx"], ["head.onnx", "tail.onnx"]):
        raise _fail(
            f"a bundle holds model.onnx, or head.onnx and tail.onnx (a partitioned model); got {sorted(names)}: "
            "name the files so (devices load them by these names)"
        )
    partitioned = sorted(names) == ["head.onnx", "tail.onnx"]
    if partition_plan is not None and not partitioned:
        raise _fail("--partition-plan goes with head.onnx and tail.onnx; model.onnx is the whole model, not a split")
    if partition_plan is None and partitioned:
        raise _fail(
            "head.onnx and tail.onnx need --partition-plan (the plan.json `edgefleet partition plan --out` wrote "
            "beside them): devices read from it where each part runs"
        )


def _partition_plan(path: Path, models: dict[str, onnx.ModelProto]) -> dict[str, Any]:
    """The plan, validated and checked against the head and tail, as the manifest carries it."""
    from pydantic import ValidationError

    from edgefleet_core.partition.plan import PartitionPlan, check_head_tail

    if path.stat().st_size > MAX_PLAN_BYTES:
        raise EdgeFleetError(f"{path}: a partition plan is at most {MAX_PLAN_BYTES} bytes")
    try:
        plan = PartitionPlan.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the document"
        raise EdgeFleetError(f"{path}: not an edgefleet partition plan ({where}: {first['msg']})") from None
    check_head_tail(plan, models["head.onnx"], models["tail.onnx"])
    # The canonical form is what `partition plan --out` wrote: the plan id stays the same once signed.
    document: dict[str, Any] = json.loads(plan.canonical_json())
    return document


def _echo_published(bundles: list[BuiltBundle], decoded: int, self_test: SelfTest | None) -> None:
    for built in bundles:
        encoded = sum(len(p) for p in built.payloads.values())
        kind = "delta" if built.prefix.rsplit("/", 1)[-1].startswith("delta-from-") else "full"
        typer.echo(f"{kind:5} {built.prefix}: {encoded} bytes for {decoded} ({decoded / max(encoded, 1):.1f}x)")
    if self_test is not None:
        slo = "no latency SLO" if self_test.latency_slo_ms is None else f"latency SLO {self_test.latency_slo_ms} ms"
        typer.echo(f"self-test: {len(self_test.inputs)} inputs, {len(self_test.outputs)} outputs, {slo}")


def _check_replaceable(out: Path) -> None:
    """``out`` is replaced whole: only a new folder or an earlier fetch output (a valid manifest) qualifies."""
    from edgefleet_core.bundle.distribution import MANIFEST
    from edgefleet_core.bundle.manifest import parse_manifest

    if not out.exists():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    try:
        parse_manifest((out / MANIFEST).read_bytes())
    except (OSError, EdgeFleetError):
        raise EdgeFleetError(
            f"{out} exists and is not an earlier `edgefleet fetch` output; choose a new folder"
        ) from None


def publish(
    files: Annotated[list[Path], typer.Argument(help="model.onnx, or head.onnx and tail.onnx.")],
    store: Store,
    keys: Annotated[Path, typer.Option("--keys", help="Key folder from `edgefleet keys init`.")],
    model: Annotated[str, typer.Option("--model", help="EdgeModel name.")],
    version: Annotated[str, typer.Option("--version", help="The new version (versions are immutable).")],
    device_class: Annotated[str, typer.Option("--device-class", help="DeviceClass the files are built for.")],
    namespace: Namespace = "default",
    report: Annotated[
        Path | None, typer.Option(help="report.json of `edgefleet optimize`: lineage and metrics for the manifest.")
    ] = None,
    golden_data: Annotated[
        Path | None,
        typer.Option(help="NPZ of sample inputs by graph input name for the self-test; default generated inputs."),
    ] = None,
    latency_slo_ms: Annotated[
        float | None, typer.Option(min=0.001, help="Self-test latency SLO: p95 of the golden runs on the device.")
    ] = None,
    no_self_test: Annotated[
        bool, typer.Option("--no-self-test", help="Publish without self-test data (devices only load the model).")
    ] = False,
    partition_plan: Annotated[
        Path | None,
        typer.Option(
            "--partition-plan", help="plan.json of `edgefleet partition plan --out`: required with head and tail."
        ),
    ] = None,
    endpoint: Endpoint = None,
    access_key: AccessKey = None,
    secret_key: SecretKey = None,
) -> None:
    """Encode, sign and publish a bundle; with an earlier version present, a delta bundle too.

    The manifest carries a self-test (golden inputs and the outputs ONNX Runtime gives on the CPU)
    that devices run before a new version takes traffic; for a head and a tail, also the partition
    plan (signed with the bundle), which tells devices where each runs.
    """
    from edgefleet_core.bundle.distribution import BundleRef
    from edgefleet_core.bundle.publisher import Publisher
    from edgefleet_core.optimize.model_io import parse_model, write_file_atomic
    from edgefleet_core.signing.keys import KeySet
    from edgefleet_core.store.url import open_store

    _check_files([path.name for path in files], partition_plan)
    if no_self_test and (golden_data is not None or latency_slo_ms is not None):
        raise _fail("--no-self-test leaves no self-test for --golden-data or --latency-slo-ms")
    try:
        contents = {path.name: path.read_bytes() for path in files}
        models = {name: parse_model(data, name) for name, data in contents.items()}  # never sign a non-model
        plan = None if partition_plan is None else _partition_plan(partition_plan, models)
        facts = _report_facts(report, contents)
        self_test = None if no_self_test else _self_test(contents, golden_data, latency_slo_ms)
        artifacts = open_store(store, endpoint=endpoint, access_key=access_key, secret_key=secret_key)
        publisher = Publisher(artifacts, KeySet.load(keys))
        root_file = keys / "root.json"
        if not publisher.is_initialized():
            write_file_atomic(root_file, publisher.ensure_initialized())
            typer.echo(f"initialized the repository; clients trust {root_file}")
        ref = BundleRef(namespace, model, device_class, version)
        # No build key: a version given by hand is published as given, or refused if it exists.
        published = publisher.publish(ref, contents, build_key=None, partition_plan=plan, self_test=self_test, **facts)
    except EdgeFleetError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"{exc.filename or ''} {exc.strerror or exc}".strip()) from None
    _echo_published(list(published.bundles), sum(len(data) for data in contents.values()), self_test)
    if published.repository is not None:  # always set when a write happened, i.e. without a build key
        versions = published.repository
        typer.echo(f"published; targets version {versions.targets}, timestamp version {versions.timestamp}")


def fetch(
    store: Store,
    trusted_root: Annotated[Path, typer.Option("--trusted-root", help="root.json to trust (from the publisher).")],
    model: Annotated[str, typer.Option("--model", help="EdgeModel name.")],
    device_class: Annotated[str, typer.Option("--device-class", help="DeviceClass to fetch for.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the verified, decoded files and manifest.")],
    namespace: Namespace = "default",
    version: Annotated[str | None, typer.Option(help="Version to fetch; default the newest.")] = None,
    base: Annotated[
        Path | None, typer.Option(help="An earlier `fetch --out` folder: use a delta against it when published.")
    ] = None,
    metadata_dir: Annotated[
        Path | None, typer.Option(help="Where verified TUF metadata is kept between runs (rollback protection).")
    ] = None,
    endpoint: Endpoint = None,
    access_key: AccessKey = None,
    secret_key: SecretKey = None,
) -> None:
    """Fetch a bundle, verify every byte against signed metadata, decode, and write it to --out."""
    from edgefleet_core.bundle.distribution import MANIFEST, BundleRef, fetch_bundle, manifest_json
    from edgefleet_core.bundle.manifest import parse_manifest
    from edgefleet_core.optimize.lineage import default_cache_dir
    from edgefleet_core.optimize.model_io import write_dir_atomic
    from edgefleet_core.signing.client import TufClient
    from edgefleet_core.signing.fetcher import StoreFetcher
    from edgefleet_core.store.url import open_store

    try:
        _check_replaceable(out)
        root = trusted_root.read_bytes()
        # Keyed by the store alone: the verified state must survive a new trusted root after a rotation.
        state = metadata_dir or default_cache_dir() / "tuf" / hashlib.sha256(store.rstrip("/").encode()).hexdigest()
        artifacts = open_store(store, endpoint=endpoint, access_key=access_key, secret_key=secret_key)
        client = TufClient(StoreFetcher(artifacts), root, state)
        held = None
        if base is not None:
            base_manifest = parse_manifest((base / MANIFEST).read_bytes())
            held = (base_manifest.version, {f.name: (base / f.name).read_bytes() for f in base_manifest.files})
        fetched = fetch_bundle(client, BundleRef(namespace, model, device_class, version), base=held)
        write_dir_atomic(out, {**fetched.files, MANIFEST: manifest_json(fetched.manifest)})
    except EdgeFleetError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"{exc.filename or ''} {exc.strerror or exc}".strip()) from None
    manifest = fetched.manifest
    how = "as a delta" if fetched.delta else "in full"
    typer.echo(
        f"verified {namespace}/{model} {manifest.version} for {device_class} ({fetched.transferred_bytes} bytes "
        f"{how}); wrote {', '.join(sorted(fetched.files))} to {out}"
    )
