"""Addressing inside a JSON document, for the fuzz targets that mutate manifests, metadata and specs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Json = Any
"""A parsed JSON value (dict, list, str, int, float, bool or None)."""


def paths(node: Json, here: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path in ``node`` (dict keys and list indexes), ``here`` first, parents before children."""
    yield here
    if isinstance(node, dict):
        for key, child in node.items():
            yield from paths(child, (*here, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from paths(child, (*here, index))


def at(root: Json, path: tuple[Any, ...]) -> Json:
    """The value at ``path`` in ``root``."""
    for part in path:
        root = root[part]
    return root
