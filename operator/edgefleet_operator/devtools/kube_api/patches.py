"""PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic merge treated as merge.

Strategic merge patch differs from merge patch only for lists that declare a merge key in the Go
types (containers, ports, ...); the objects kopf and our operator patch have none of those, so
treating it as a merge patch answers them exactly. Server-side apply is not modelled (415).
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from edgefleet_operator.devtools.kube_api.errors import bad_request, unprocessable, unsupported_media_type

JsonObject = dict[str, Any]

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"


def merge_patch(target: object, patch: object) -> object:
    """RFC 7386: objects merge recursively, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def apply_patch(current: JsonObject, content_type: str, patch: object) -> JsonObject:
    """``current`` with ``patch`` applied; the errors are the real server's for each failure."""
    media = content_type.split(";", maxsplit=1)[0].strip().lower()
    if media in (MERGE, STRATEGIC):
        if not isinstance(patch, dict):
            raise bad_request("error decoding patch: a merge patch must be a JSON object")
        return merge_patch(current, patch)  # type: ignore[return-value]  # a dict patch gives a dict
    if media == JSON_PATCH:
        if not isinstance(patch, list):
            raise bad_request(
                "error decoding patch: json: cannot unmarshal object into Go value of type jsonpatch.Patch"
            )
        try:
            patched = jsonpatch.JsonPatch(patch).apply(current)
        except jsonpatch.InvalidJsonPatch as exc:
            raise bad_request(f"error decoding patch: {exc}") from exc
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise unprocessable(f"the server rejected our request due to an error in our request: {exc}") from exc
        except (TypeError, KeyError, IndexError) as exc:  # a malformed operation (no "op", bad "path")
            raise bad_request(f"error decoding patch: {exc!r}") from exc
        if not isinstance(patched, dict):
            raise unprocessable("the server rejected our request: the patch replaced the whole object")
        return patched
    raise unsupported_media_type(content_type)
