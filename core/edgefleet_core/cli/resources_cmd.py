"""``edgefleet resources``: check, default and explain EdgeFleet resources without a cluster."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from edgefleet_core.errors import ResourceError
from edgefleet_core.resources import (
    apply_defaults,
    custom_resource_definitions,
    parse_resource,
    read_documents,
)
from edgefleet_core.resources.crds import CRD_FILES, crd_text

app = typer.Typer(help="Validate, default and explain EdgeFleet resources offline, as the API server would.")


class OutputFormat(StrEnum):
    """How results are printed."""

    text = "text"
    json = "json"


@app.command()
def validate(
    paths: Annotated[list[Path], typer.Argument(help="Resource files or folders (YAML/JSON, multi-document).")],
    output: Annotated[OutputFormat, typer.Option("--output", "-o", help="text or json.")] = OutputFormat.text,
) -> None:
    """Check resources against the CRD schemas and models; exit 1 naming every field at fault."""
    results: list[dict[str, Any]] = []
    for path in paths:
        try:
            documents = read_documents(path)
        except ResourceError as exc:
            results.append({"source": exc.source, "kind": None, "name": None, "problems": exc.problems})
            continue
        for doc in documents:
            metadata = doc.body.get("metadata")
            name = metadata.get("name") if isinstance(metadata, dict) else None
            entry: dict[str, Any] = {"source": doc.source, "kind": doc.body.get("kind"), "name": name, "problems": []}
            try:
                parse_resource(doc.body, doc.source)
            except ResourceError as exc:
                entry["problems"] = exc.problems
            results.append(entry)
    failed = [r for r in results if r["problems"]]
    if output is OutputFormat.json:
        payload = [{**r, "valid": not r["problems"], "problems": [vars(p) for p in r["problems"]]} for r in results]
        typer.echo(json.dumps(payload, indent=2))
    else:
        _print_results(results)
    if failed or not results:
        raise typer.Exit(code=1)


def _print_results(results: list[dict[str, Any]]) -> None:
    # One line per resource and per problem, never wrapped or cut, so CI logs can be grepped.
    if not results:
        typer.echo("no resources found", err=True)
        return
    for r in results:
        what = f"{r['kind'] or '?'}/{r['name'] or '?'}"
        if not r["problems"]:
            typer.echo(f"valid    {what}  ({r['source']})")
        for problem in r["problems"]:
            typer.echo(f"invalid  {what}  ({r['source']})  {problem}")
    failed = sum(1 for r in results if r["problems"])
    typer.echo(f"{len(results) - failed} valid, {failed} invalid")


@app.command()
def defaults(
    path: Annotated[Path, typer.Argument(help="A resource file (YAML/JSON).")],
) -> None:
    """Print resources with the CRD defaults filled in, as the API server would store them."""
    try:
        docs = read_documents(path)
        out = []
        for doc in docs:
            resource = parse_resource(doc.body, doc.source)
            out.append(apply_defaults(resource.kind, doc.body))
    except ResourceError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(code=1) from None
    typer.echo(yaml.safe_dump_all(out, sort_keys=False), nl=False)


@app.command()
def crds() -> None:
    """Print the CRDs (pipe to ``kubectl apply -f -``)."""
    typer.echo("---\n".join(crd_text(name) for name in CRD_FILES), nl=False)


@app.command()
def explain(
    field: Annotated[str, typer.Argument(help="KIND or KIND.field.path, e.g. EdgeModel.spec.rollout.")],
) -> None:
    """Describe a resource field offline, like ``kubectl explain``."""
    kind, _, rest = field.partition(".")
    crds_by_kind = {k.lower(): crd for k, crd in custom_resource_definitions().items()}
    crd = crds_by_kind.get(kind.lower())
    if crd is None:
        typer.echo(f"unknown kind {kind!r}; one of {', '.join(custom_resource_definitions())}", err=True)
        raise typer.Exit(code=1)
    node: dict[str, Any] = crd.schema
    walked: list[str] = []
    for part in filter(None, rest.split(".")):
        while node.get("type") == "array":
            node = node["items"]
        children = node.get("properties", {})
        if part not in children:
            where = ".".join([crd.kind, *walked]) or crd.kind
            typer.echo(f"{where} has no field {part!r}; fields: {', '.join(children) or '(none)'}", err=True)
            raise typer.Exit(code=1)
        node = children[part]
        walked.append(part)
    typer.echo(_describe(".".join([crd.kind, *walked]), node))


def _describe(name: str, node: dict[str, Any]) -> str:
    lines = [f"FIELD: {name} <{_type_of(node)}>"]
    for key, label in (("enum", "ENUM"), ("default", "DEFAULT"), ("pattern", "PATTERN")):
        if key in node:
            lines.append(f"{label}: {node[key]}")
    bounds = [f"{k}={node[k]}" for k in ("minimum", "maximum", "minItems", "maxItems", "maxLength") if k in node]
    if bounds:
        lines.append("BOUNDS: " + ", ".join(bounds))
    if node.get("description"):
        lines += ["", "DESCRIPTION:", f"  {node['description']}"]
    inner = node["items"] if node.get("type") == "array" else node
    required = set(inner.get("required", []))
    if inner.get("properties"):
        lines += ["", "FIELDS:"]
        for child, spec in inner["properties"].items():
            marker = " -required-" if child in required else ""
            lines.append(f"  {child} <{_type_of(spec)}>{marker}")
            if spec.get("description"):
                lines.append(f"    {spec['description']}")
    for rule in node.get("x-kubernetes-validations", []):
        lines.append(f"RULE: {rule['message']}")
    return "\n".join(lines)


def _type_of(node: dict[str, Any]) -> str:
    if node.get("type") == "array":
        return f"[]{_type_of(node.get('items', {}))}"
    if node.get("type") == "object" and "additionalProperties" in node:
        return f"map[string]{_type_of(node['additionalProperties'])}"
    return str(node.get("type", "any"))
