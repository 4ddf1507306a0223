"""Reading an EdgeModel's source model and evaluation data, pinned by sha256.

Every byte the pipeline sees comes through :meth:`SourceResolver.read`, which caps the size and
checks the digest the spec pins before anything parses the data. Failures are sorted by who can fix
them: a missing or refused object, a digest that differs, a file that is not a model are the
user's (:class:`~.errors.SpecError` naming the field); a store or server that cannot be reached is
the infrastructure's (:class:`~.errors.TransientError`, retried).

URIs:

- ``file:///abs/path``: a file the operator can read (a mounted volume, or the local machine);
- ``file://./rel/path``, ``file:rel/path`` or a bare ``rel/path``: relative to ``base_dir``, only in
  local mode (``edgefleet up -f DIR`` reads sources beside the resource files);
- ``s3://bucket/key``: S3 or MinIO through :mod:`edgefleet_core.store` (credentials from the
  environment, endpoint from the settings);
- ``http(s)://...``: a plain download (the CRD allows it; the sha256 makes the transport irrelevant).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import stat
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final
from urllib.parse import SplitResult, unquote, urlsplit

import numpy as np

from edgefleet_core.errors import (
    DataError,
    ModelError,
    StoreAuthError,
    StoreError,
    StoreLimitExceeded,
    StoreNotFound,
    StoreUnavailable,
)
from edgefleet_core.optimize.data import Dataset, dataset_for
from edgefleet_core.optimize.model_io import LoadedModel, fit_ir_version, parse_model, sha256_hex, upgrade_opset
from edgefleet_core.resources.edge_model import AccuracyBudget, ModelSource
from edgefleet_core.store.s3 import RetryPolicy, S3Store, minio_client
from edgefleet_core.store.url import parse_s3_url
from edgefleet_operator.reconcile.errors import SpecError, TransientError

DEFAULT_MAX_BYTES: Final = 1 << 30
"""Largest source or data file read (1 GiB)."""
STORE_OPTION_KEYS: Final = frozenset({"endpoint", "access_key", "secret_key", "region", "secure"})
"""What ``store_options`` may say about reaching ``s3://`` sources; anything else is a configuration error."""
SOURCE_FIELD: Final = "spec.source"
EVALUATION_DATA_FIELD: Final = "spec.accuracy.evaluationData"
_READ_CHUNK: Final = 1 << 20
_RELATIVE_HOSTS: Final = frozenset({".", ".."})
"""``file://./x`` and ``file://../x`` read as relative paths (the only relative form the CRD's URI pattern admits)."""
_FINAL_HTTP_STATUSES: Final = frozenset({400, 401, 403, 404, 405, 410, 414, 451})
"""HTTP answers no retry changes: the user must fix the URI (or grant access)."""


class SourceResolver:
    """Reads ``spec.source`` and ``spec.accuracy.evaluationData`` and verifies them against their sha256."""

    def __init__(
        self,
        *,
        base_dir: Path | None = None,
        store_options: Mapping[str, str] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        http_timeout_s: float = 60.0,
        s3_retry: RetryPolicy | None = None,
    ) -> None:
        """``base_dir``: the folder relative sources resolve against (local mode only; ``None`` refuses them).

        ``store_options``: how to reach ``s3://`` sources: ``endpoint`` (``host:port`` or
        ``http(s)://host:port``), ``access_key``, ``secret_key``, ``region``, ``secure``
        (``true``/``false``); what is not given comes from the standard environment variables.
        ``http_timeout_s`` bounds a whole ``http(s)://`` download; ``s3_retry`` how hard S3 reads retry.
        """
        options = dict(store_options or {})
        unknown = sorted(set(options) - STORE_OPTION_KEYS)
        if unknown:
            raise ValueError(f"unknown store options {unknown}; known: {sorted(STORE_OPTION_KEYS)}")
        secure = options.get("secure")
        if secure is not None and secure.lower() not in ("true", "false"):
            raise ValueError(f"store option secure must be true or false, not {secure!r}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self.base_dir = base_dir
        self.max_bytes = max_bytes
        self.http_timeout_s = http_timeout_s
        self._store_options = options
        self._secure = None if secure is None else secure.lower() == "true"
        self._s3_retry = s3_retry

    # -- reading and verifying -----------------------------------------------------------------

    def read(self, uri: str, sha256: str, *, field: str) -> bytes:
        """The bytes at ``uri``, checked against ``sha256``; errors name ``{field}.uri`` or ``{field}.sha256``."""
        data = self._fetch(uri, f"{field}.uri")
        actual = sha256_hex(data)
        if actual != sha256.lower():
            raise SpecError(f"{field}.sha256", f"the file's sha256 is {actual}, the spec says {sha256}")
        return data

    def load_model(self, source: ModelSource) -> LoadedModel:
        """``spec.source`` read, verified and checked as ONNX (opset upgraded, IR version fitted as the CLI does)."""
        data = self.read(source.uri, source.sha256, field=SOURCE_FIELD)
        notes: list[str] = []
        try:
            # No base folder: the sha256 pins this one file, so external data (other files) is refused.
            model = parse_model(data, source.uri)
            model = fit_ir_version(upgrade_opset(model, source.uri, notes), source.uri, notes)
        except ModelError as exc:
            raise SpecError(f"{SOURCE_FIELD}.uri", f"not a usable ONNX model: {exc.problem}") from None
        return LoadedModel(model=model, digest=sha256_hex(data), path=self._display_path(source.uri), notes=notes)

    def load_evaluation_data(self, accuracy: AccuracyBudget | None, model: LoadedModel) -> tuple[Dataset, str] | None:
        """The evaluation data for ``model`` and the digest of what the pipeline sees; ``None`` without any.

        With ``samples`` set only the first that many samples are used, and the digest covers that
        choice too (the variant cache must not mix variants calibrated on different subsets).
        """
        if accuracy is None or accuracy.evaluation_data is None:
            return None
        spec = accuracy.evaluation_data
        data = self.read(spec.uri, spec.sha256, field=EVALUATION_DATA_FIELD)
        arrays = _npz_arrays(data, spec.uri)
        try:
            dataset = dataset_for(model.model, arrays, spec.uri)
        except DataError as exc:
            raise SpecError(EVALUATION_DATA_FIELD, f"does not fit the model: {exc.problem}") from None
        except ModelError as exc:  # an input the data format cannot carry (a sequence, a map)
            raise SpecError(f"{SOURCE_FIELD}.uri", exc.problem) from None
        if spec.samples is None:
            return dataset, spec.sha256
        digest = hashlib.sha256(f"{spec.sha256}\nsamples={spec.samples}".encode()).hexdigest()
        return dataset.take(spec.samples), digest

    # -- transports ----------------------------------------------------------------------------

    def _fetch(self, uri: str, field: str) -> bytes:
        parts = urlsplit(uri)
        if parts.scheme == "s3":
            return self._read_s3(uri, field)
        if parts.scheme in ("http", "https"):
            return self._read_http(uri, field)
        if parts.scheme in ("file", ""):
            return self._read_file(self._file_path(uri, parts, field), field)
        raise SpecError(field, f"unsupported URI scheme {parts.scheme!r}: use file://, s3:// or https://")

    def _file_path(self, uri: str, parts: SplitResult, field: str) -> Path:
        if parts.query or parts.fragment:
            raise SpecError(field, f"{uri!r}: a file URI takes no query or fragment")
        host = parts.netloc
        if host not in ("", "localhost", *_RELATIVE_HOSTS):
            raise SpecError(field, f"{uri!r} names host {host!r}; a file URI names a local path (file:///abs/path)")
        raw = unquote(host + parts.path) if host in _RELATIVE_HOSTS else unquote(parts.path)
        if not raw:
            raise SpecError(field, f"{uri!r} names no file")
        path = Path(raw)
        if path.is_absolute():
            return path
        if self.base_dir is None:
            raise SpecError(
                field,
                f"{uri!r} is a relative path, which only local mode (edgefleet up -f) resolves; "
                "use file:///absolute/path or s3://bucket/key",
            )
        return self.base_dir / path

    def _read_file(self, path: Path, field: str) -> bytes:
        try:
            # O_NONBLOCK: a FIFO or device at the path must be refused, not block the reconciler forever.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise SpecError(field, f"no file at {path}") from None
        except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            raise SpecError(field, f"cannot read {path}: {exc.strerror or exc}") from None
        except OSError as exc:  # I/O trouble of the volume (EIO, ESTALE): may pass
            raise TransientError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SpecError(field, f"{path} is not a regular file")
            if info.st_size > self.max_bytes:
                raise SpecError(field, f"{path} is {info.st_size} bytes, over the limit of {self.max_bytes}")
            data = _read_capped(lambda size: os.read(fd, size), self.max_bytes)
        except OSError as exc:
            raise TransientError(f"cannot read {path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        if data is None:  # it grew since the stat
            raise SpecError(field, f"{path} is over the limit of {self.max_bytes} bytes")
        return data

    def _read_s3(self, uri: str, field: str) -> bytes:
        options = self._store_options
        try:
            where = parse_s3_url(
                uri,
                endpoint=options.get("endpoint"),
                access_key=options.get("access_key"),
                secret_key=options.get("secret_key"),
                secure=self._secure,
                region=options.get("region"),
            )
        except StoreError as exc:
            raise SpecError(field, str(exc)) from None
        if not where.prefix:
            raise SpecError(field, f"{uri!r} names a bucket but no object: expected s3://bucket/key")
        client = minio_client(
            where.endpoint,
            access_key=where.access_key,
            secret_key=where.secret_key,
            secure=where.secure,
            region=where.region,
        )
        store = S3Store(client, where.bucket, retry=self._s3_retry)
        try:
            return store.get(where.prefix, max_bytes=self.max_bytes)
        except StoreUnavailable as exc:
            raise TransientError(f"cannot reach the store for {uri}: {exc}") from None
        except StoreNotFound as exc:
            raise SpecError(field, f"{uri}: {exc}") from None
        except StoreLimitExceeded:
            raise SpecError(field, f"{uri} is over the limit of {self.max_bytes} bytes") from None
        except StoreAuthError as exc:
            raise SpecError(field, f"{exc}; point the URI at an object the operator may read") from None
        except StoreError as exc:  # any other refusal by the store (a 4xx): the same request fails again
            raise SpecError(field, f"{uri}: {exc}") from None

    def _read_http(self, uri: str, field: str) -> bytes:
        deadline = time.monotonic() + self.http_timeout_s
        request = urllib.request.Request(uri, headers={"User-Agent": "edgefleet-operator"})  # noqa: S310 - http(s) only
        try:
            with urllib.request.urlopen(request, timeout=self.http_timeout_s) as response:  # noqa: S310 - as above
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                    raise SpecError(field, f"{uri} is {declared} bytes, over the limit of {self.max_bytes}")

                # Chunks against one deadline: a server dripping bytes must not hold the reconciler forever.
                def chunk(size: int) -> bytes:
                    if time.monotonic() > deadline:
                        raise TransientError(f"downloading {uri} took over {self.http_timeout_s} s")
                    return bytes(response.read(size))

                data = _read_capped(chunk, self.max_bytes)
                if data is None:
                    raise SpecError(field, f"{uri} is over the limit of {self.max_bytes} bytes")
                return data
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the connection
            if exc.code in _FINAL_HTTP_STATUSES:
                raise SpecError(field, f"{uri}: the server answered HTTP {exc.code} {exc.reason}") from None
            raise TransientError(f"{uri}: the server answered HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise TransientError(f"cannot reach {uri}: {exc.reason}") from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            raise TransientError(f"downloading {uri} failed: {type(exc).__name__}: {exc}") from None

    def _display_path(self, uri: str) -> Path:
        """Where the model came from, for reports (a local path, else the URI as written)."""
        parts = urlsplit(uri)
        if parts.scheme in ("file", ""):
            with contextlib.suppress(SpecError):
                return self._file_path(uri, parts, "")
        return Path(uri)


def _read_capped(read: Callable[[int], bytes], limit: int) -> bytes | None:
    """Everything ``read`` gives until it gives nothing, or ``None`` as soon as that is over ``limit`` bytes."""
    buffer = io.BytesIO()
    while chunk := read(min(_READ_CHUNK, limit + 1 - buffer.tell())):
        buffer.write(chunk)
        if buffer.tell() > limit:
            return None
    return buffer.getvalue()


def _npz_arrays(data: bytes, source: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` held in memory; never unpickles (data must not be able to run code)."""
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise SpecError(EVALUATION_DATA_FIELD, f"{source} is a single array, not an .npz of named arrays")
        with loaded as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise SpecError(EVALUATION_DATA_FIELD, f"{source} is not a readable .npz file: {exc}") from None
