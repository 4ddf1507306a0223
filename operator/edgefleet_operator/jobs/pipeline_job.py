"""``edgefleet pipeline-job``: build one (EdgeModel, DeviceClass) variant, as a Kubernetes Job runs it.

A Typer app whose callback is the command, so that the ``edgefleet.cli`` entry point
``pipeline-job`` mounts it as ``edgefleet pipeline-job [OPTIONS]``. It reads the source, runs the
same :func:`~edgefleet_operator.reconcile.variants.build_variant` the operator's worker pool runs,
and leaves the variant and a report in the artifact store (:mod:`.staging`); the operator signs and
publishes it. It holds no signing keys. Machinery is imported when the command runs.

Exit codes: 0 built (or already built); 3 refused: the spec cannot be met (the report names the
field); 1 any other failure (the report says what, when the store could be written); 2 usage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgefleet_core.cli.bundle_cmd import CacheDir, Endpoint, Region
from edgefleet_core.errors import EdgeFleetError
from edgefleet_operator.jobs.manifest import CLASS_ENV, EXIT_REFUSED, MODEL_ENV

# ruff: noqa: PLC0415  (a CLI module: the pipeline is imported when the command runs)

if TYPE_CHECKING:
    from edgefleet_core.resources.device_class import DeviceClass
    from edgefleet_core.resources.edge_model import EdgeModel
    from edgefleet_core.store.base import ArtifactStore
    from edgefleet_operator.jobs.staging import BuildLocation, BuildReport

app = typer.Typer(
    help=(
        "Build one EdgeModel variant for one DeviceClass and leave it in the artifact store for the operator "
        "to sign and publish (what a pipeline Job runs)."
    ),
    invoke_without_command=True,
    subcommand_metavar="",
    pretty_exceptions_enable=False,
)


class JobInputError(EdgeFleetError):
    """The Job was given inputs it cannot use (operator and image out of step, a damaged environment)."""


@app.callback()
def pipeline_job(
    build_key: Annotated[str, typer.Option("--build-key", help="The build key the operator computed (64 hex digits).")],
    version: Annotated[str, typer.Option("--version", help="The version the build is for (recorded in the report).")],
    store: Annotated[
        str, typer.Option("--store", help="Artifact store: file:///absolute/path, s3://bucket or s3://bucket/prefix.")
    ],
    edge_model_file: Annotated[
        Path | None,
        typer.Option("--edge-model-file", help=f"The EdgeModel as JSON or YAML; default: the {MODEL_ENV} variable."),
    ] = None,
    device_class_file: Annotated[
        Path | None,
        typer.Option(
            "--device-class-file", help=f"The DeviceClass as JSON or YAML; default: the {CLASS_ENV} variable."
        ),
    ] = None,
    cache_dir: CacheDir = None,
    endpoint: Endpoint = None,
    region: Region = None,
) -> None:
    """Build the variant; S3 credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."""
    from edgefleet_core.store.url import open_store
    from edgefleet_operator.jobs.staging import BuildLocation, BuildReport
    from edgefleet_operator.reconcile.errors import SpecError

    try:
        model, device_class = _inputs(edge_model_file, device_class_file)
        artifacts = open_store(store, endpoint=endpoint, region=region)
    except EdgeFleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    where = BuildLocation(
        model.metadata.namespace or "default", model.metadata.name, device_class.metadata.name, build_key
    )
    try:
        report = _build(artifacts, where, model, device_class, version, cache_dir, endpoint=endpoint, region=region)
    except SpecError as exc:
        refused = BuildReport(
            outcome="refused", build_key=build_key, version=version, field=exc.field, message=exc.message
        )
        _record(artifacts, where, refused)
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(code=EXIT_REFUSED) from None
    except EdgeFleetError as exc:
        _record(artifacts, where, BuildReport(outcome="error", build_key=build_key, version=version, message=str(exc)))
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    except Exception as exc:
        # The process edge: a bug must still leave the operator a reason, then fail loudly here.
        message = f"{type(exc).__name__}: {exc}"
        _record(artifacts, where, BuildReport(outcome="error", build_key=build_key, version=version, message=message))
        raise
    variant = report.variant
    assert variant is not None
    size = sum(f.size for f in variant.files)
    typer.echo(
        f"built {where.namespace}/{where.model} for {where.device_class}: version {version}, "
        f"variant {variant.variant_id}, {size} bytes, report {where.report_key}"
    )


def _build(
    artifacts: ArtifactStore,
    where: BuildLocation,
    model: EdgeModel,
    device_class: DeviceClass,
    version: str,
    cache_dir: Path | None,
    *,
    endpoint: str | None,
    region: str | None,
) -> BuildReport:
    from edgefleet_core.optimize.lineage import VariantCache
    from edgefleet_core.training import load_trainer
    from edgefleet_operator.jobs.staging import read_report, stage_variant
    from edgefleet_operator.reconcile.build_key import build_key, pinned_data_sha256
    from edgefleet_operator.reconcile.sources import SourceResolver
    from edgefleet_operator.reconcile.variants import build_variant

    computed = build_key(model, device_class, data_sha256=pinned_data_sha256(model.spec))
    if computed != where.build_key:
        raise JobInputError(
            f"this image computes build key {computed} for these inputs, the operator asked for {where.build_key}: "
            "the Job image and the operator are different EdgeFleet versions"
        )
    done = read_report(artifacts, where)
    if done is not None and done.outcome == "built":
        return done  # a retried pod after the report was written: nothing to do
    options = {k: v for k, v in (("endpoint", endpoint), ("region", region)) if v is not None}
    sources = SourceResolver(store_options=options)
    source = sources.load_model(model.spec.source)
    data = sources.load_evaluation_data(model.spec.accuracy, source)
    cache = VariantCache(cache_dir) if cache_dir is not None else None
    built = build_variant(model, device_class, source, data, cache=cache, trainer=load_trainer())
    return stage_variant(artifacts, where, version, built)


def _record(artifacts: ArtifactStore, where: BuildLocation, report: BuildReport) -> None:
    """Write a failure report; when the store cannot take it the exit code alone tells the operator."""
    from edgefleet_operator.jobs.staging import write_report

    try:
        write_report(artifacts, where, report)
    except EdgeFleetError as exc:
        typer.echo(f"error: cannot write the build report: {exc}", err=True)


def _inputs(edge_model_file: Path | None, device_class_file: Path | None) -> tuple[EdgeModel, DeviceClass]:
    from pydantic import ValidationError

    from edgefleet_core.resources.device_class import DeviceClass
    from edgefleet_core.resources.edge_model import EdgeModel

    model_document = _document(edge_model_file, MODEL_ENV, "--edge-model-file")
    class_document = _document(device_class_file, CLASS_ENV, "--device-class-file")
    try:
        model = EdgeModel.model_validate(model_document)
    except ValidationError as exc:
        raise JobInputError(f"the EdgeModel does not parse: {exc}") from None
    try:
        device_class = DeviceClass.model_validate(class_document)
    except ValidationError as exc:
        raise JobInputError(f"the DeviceClass does not parse: {exc}") from None
    return model, device_class


def _document(path: Path | None, variable: str, option: str) -> dict[str, Any]:
    import yaml

    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise JobInputError(f"{option}: cannot read {path}: {exc.strerror or exc}") from None
        where = str(path)
    else:
        found = os.environ.get(variable)
        if not found:
            raise JobInputError(f"give {option} or set {variable}")
        text, where = found, variable
    try:
        document = json.loads(text) if path is None else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise JobInputError(f"{where}: not JSON or YAML: {exc}") from None
    if not isinstance(document, dict):
        raise JobInputError(f"{where}: not an object")
    return document


if __name__ == "__main__":
    app()
