"""``edgefleet keys``: the signing keys of a bundle repository (TUF roles, Ed25519)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from edgefleet_core.cli.bundle_cmd import AccessKey, Endpoint, Region, SecretKey, Store
from edgefleet_core.errors import EdgeFleetError, SigningError

app = typer.Typer(help="Create signing keys, and put them in a Kubernetes Secret for the operator.")


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="New folder for the key files (created 0700, files 0600).")],
    root_keys: Annotated[int, typer.Option(min=1, max=16, help="Root keys to create.")] = 1,
    root_threshold: Annotated[int, typer.Option(min=1, max=16, help="Root signatures a new root needs.")] = 1,
    force: Annotated[bool, typer.Option(help="Replace keys already in DIRECTORY.")] = False,
) -> None:
    """Create root, targets, snapshot and timestamp keys in DIRECTORY."""
    from edgefleet_core.signing.keys import KeySet

    if root_threshold > root_keys:
        raise typer.BadParameter(
            f"cannot need {root_threshold} signatures from {root_keys} keys", param_hint="--root-threshold"
        )
    try:
        keys = KeySet.generate(root_keys=root_keys, root_threshold=root_threshold)
        keys.save(directory, overwrite=force)
    except SigningError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    except OSError as exc:
        typer.echo(f"error: cannot write {directory}: {exc.strerror or exc}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(
        f"created {root_keys} root key(s) (threshold {root_threshold}) and targets, snapshot and timestamp keys "
        f"in {directory}"
    )
    typer.echo("keep the root keys offline; the operator only needs targets, snapshot and timestamp")


@app.command()
def secret(
    directory: Annotated[Path, typer.Argument(help="A key folder made by `edgefleet keys init`.")],
    name: Annotated[str, typer.Option(help="Secret name.")] = "edgefleet-signing-keys",
    namespace: Annotated[str, typer.Option(help="Secret namespace.")] = "edgefleet-system",
    include_root_keys: Annotated[
        bool,
        typer.Option(help="Also put the root private keys in the Secret (not needed to publish; keep them offline)."),
    ] = False,
) -> None:
    """Print the online keys (targets, snapshot, timestamp; root public keys) as a Kubernetes Secret manifest."""
    from edgefleet_core.signing.keys import KeySet

    try:
        keys = KeySet.load(directory)
        data = keys.to_secret_data(online_only=not include_root_keys)
    except SigningError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "edgefleet"}},
        "type": "Opaque",
        "data": data,
    }
    typer.echo(yaml.safe_dump(manifest, sort_keys=False), nl=False)


@app.command()
def root(
    store: Store,
    keys: Annotated[Path, typer.Option("--keys", help="Key folder; the root private keys are needed only to create.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the trusted root (root.json).")],
    endpoint: Endpoint = None,
    access_key: AccessKey = None,
    secret_key: SecretKey = None,
    region: Region = None,
) -> None:
    """Write the repository's trusted root for devices, creating the repository first if the store has none.

    Run it once before the operator starts: the operator holds only the online keys and cannot
    sign a root. Every device (agent --tuf-root) and the Helm chart's trust ConfigMap get this file.
    """
    from edgefleet_core.atomic import write_file_atomic
    from edgefleet_core.bundle.publisher import Publisher
    from edgefleet_core.signing.keys import KeySet
    from edgefleet_core.store.url import open_store

    try:
        key_set = KeySet.load(keys)
        artifacts = open_store(store, endpoint=endpoint, access_key=access_key, secret_key=secret_key, region=region)
        publisher = Publisher(artifacts, key_set)
        created = not publisher.is_initialized()
        if created and key_set.online_only:
            raise SigningError(
                f"{store} has no TUF repository yet and {keys} holds only the online keys: "
                "creating one signs a root, so give the folder made by `edgefleet keys init`"
            )
        trusted = publisher.ensure_initialized()
        write_file_atomic(out, trusted)
    except EdgeFleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    except OSError as exc:
        typer.echo(f"error: cannot write {out}: {exc.strerror or exc}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(f"{'created the repository; ' if created else ''}wrote the trusted root to {out}")


@app.command()
def rotate(
    store: Store,
    keys: Annotated[Path, typer.Option("--keys", help="The key folder the repository is signed with now.")],
    new_keys: Annotated[Path, typer.Option("--new-keys", help="A key folder from `keys init` to rotate to.")],
    endpoint: Endpoint = None,
    access_key: AccessKey = None,
    secret_key: SecretKey = None,
    region: Region = None,
) -> None:
    """Rotate the repository's keys: a new root signed by the old and new root keys (TUF rotation)."""
    from edgefleet_core.signing.keys import KeySet
    from edgefleet_core.signing.repository import TufRepository
    from edgefleet_core.store.url import open_store

    try:
        artifacts = open_store(store, endpoint=endpoint, access_key=access_key, secret_key=secret_key, region=region)
        repository = TufRepository(artifacts, KeySet.load(keys))
        versions = repository.rotate_root(KeySet.load(new_keys))
    except EdgeFleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(f"root is now version {versions.root}; clients that trust an older root follow the chain to it")


@app.command()
def refresh(
    store: Store,
    keys: Annotated[Path, typer.Option("--keys", help="Key folder (the online keys are enough).")],
    endpoint: Endpoint = None,
    access_key: AccessKey = None,
    secret_key: SecretKey = None,
    region: Region = None,
) -> None:
    """Re-sign the timestamp (and the snapshot when due): run at least daily, the timestamp expires after a day."""
    from edgefleet_core.signing.keys import KeySet
    from edgefleet_core.signing.repository import TufRepository
    from edgefleet_core.store.url import open_store

    try:
        artifacts = open_store(store, endpoint=endpoint, access_key=access_key, secret_key=secret_key, region=region)
        versions = TufRepository(artifacts, KeySet.load(keys)).refresh_timestamp()
    except EdgeFleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(f"timestamp is now version {versions.timestamp} (snapshot {versions.snapshot})")
