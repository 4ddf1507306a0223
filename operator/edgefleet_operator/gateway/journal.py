"""The health journal: every health report a gateway acknowledges, on local disk before the ack.

A gateway keeps health counts in memory and writes them to the store every status interval; the
agent forgets a window once the gateway acknowledged it. Without a journal, a gateway killed
between two writes (SIGKILL, the OOM killer, a node's kubelet) loses every report it acknowledged
since the last write, and the rollout's health gates then judge a version on counts that are short.

With one, :meth:`HealthJournal.append` puts each report in the current segment file before the ack
(one ``write`` of one line: once it returns, a process crash cannot take it back; a power cut can
take what the page cache had not written, up to one status interval since segments are synced
when they close). Each flush to the store closes the segment and starts the next one; once every
shard of the flush is written, the closed segments are deleted. A restarted gateway under the same
replica id replays what is left, skipping per device what its stored shard already counts (each
record carries the sequence number of the last report it includes), so nothing is counted twice.

Lines are ``<crc32 hex> <json>``: a torn last line (a power cut mid-write) is detected and ignored.
The journal lives in a folder of its own per replica id; the chart puts it on an ``emptyDir``,
which survives container restarts, the crash case this is for.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from edgefleet_core.atomic import fsync_dir, write_file_atomic
from edgefleet_core.errors import EdgeFleetError

logger = logging.getLogger(__name__)

__all__ = ["HealthJournal", "JournalEntry", "JournalError", "JournalFull"]

_SEGMENT = re.compile(r"^segment-(\d{20})\.log$")
DEFAULT_MAX_BYTES = 256 * 1024**2
"""Journal size at which reports are refused (agents keep and resend them) until a flush succeeds."""


class JournalError(EdgeFleetError):
    """The journal's folder cannot be used."""


class JournalFull(OSError):
    """The journal reached its size bound (the store has been unwritable for a long time)."""


@dataclass(frozen=True)
class JournalEntry:
    """One acknowledged report: its sequence number, the device that sent it and the report itself."""

    seq: int
    device_id: str
    namespace: str
    device_class: str
    name: str
    sample: dict[str, Any]
    """The report as :func:`encode_sample` wrote it."""


def encode_sample(sample: Any) -> dict[str, Any]:
    """A ``HealthSample`` dataclass as JSON-able values (datetimes as ISO text, the window in seconds)."""
    data = asdict(sample)
    data["window_start"] = sample.window_start.isoformat()
    data["window"] = sample.window.total_seconds()
    return data


def decode_times(data: dict[str, Any]) -> tuple[datetime, timedelta]:
    """The window start and length of an encoded sample."""
    return datetime.fromisoformat(data["window_start"]), timedelta(seconds=float(data["window"]))


class HealthJournal:
    """The segment files of one replica's journal.

    :meth:`append` and :meth:`rotate` are called under the service's health lock; :meth:`seal` and
    :meth:`discard_closed` by the one flushing thread outside it.
    """

    def __init__(self, root: Path, replica_id: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.folder = root / f"replica-{replica_id}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            probe = self.folder / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise JournalError(f"health journal folder {self.folder} is not writable: {e.strerror or e}") from e
        self.journal_id = self._identify()
        """Random, made with the folder: a folder made anew (an emptyDir of a rescheduled pod that kept
        its name) numbers from 1 again, and shards name the journal their numbers count in."""
        self.max_bytes = max_bytes
        self._fd: int | None = None
        self._sealing: list[int] = []
        self._size_lock = threading.Lock()
        self._current: int | None = None
        self._bytes = sum(p.stat().st_size for p in self._segments())
        self.next_seq = 1

    def _identify(self) -> str:
        path = self.folder / "journal-id"
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = ""
        if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
            return text
        # A new folder (or a damaged id): a new journal. Old segments, if any, belong to no known
        # journal any more and are replayed in full, as a new journal's would be.
        fresh = secrets.token_hex(16)
        write_file_atomic(path, fresh.encode())
        return fresh

    def _segments(self) -> list[Path]:
        found = [p for p in self.folder.iterdir() if _SEGMENT.match(p.name)]
        return sorted(found, key=lambda p: int(_SEGMENT.match(p.name)[1]))  # type: ignore[index]

    def replay(self) -> list[JournalEntry]:
        """Every intact entry of the segments a previous process left, oldest first; sets :attr:`next_seq`."""
        entries: list[JournalEntry] = []
        highest = 0
        for path in self._segments():
            first = int(_SEGMENT.match(path.name)[1])  # type: ignore[index]
            highest = max(highest, first - 1)
            for entry in self._read(path):
                entries.append(entry)
                highest = max(highest, entry.seq)
        self.next_seq = highest + 1
        return entries

    def _read(self, path: Path) -> Iterator[JournalEntry]:
        with path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                try:
                    crc, _, body = line.rstrip(b"\n").partition(b" ")
                    if not line.endswith(b"\n") or int(crc, 16) != zlib.crc32(body):
                        raise ValueError("checksum mismatch or torn line")
                    data = json.loads(body)
                    yield JournalEntry(
                        seq=int(data["seq"]),
                        device_id=str(data["device_id"]),
                        namespace=str(data["namespace"]),
                        device_class=str(data["device_class"]),
                        name=str(data["name"]),
                        sample=dict(data["sample"]),
                    )
                except (ValueError, KeyError, TypeError) as e:
                    # Only a power cut mid-write makes one, and only at the end of the last segment.
                    logger.warning("health journal %s line %d unreadable, rest of the segment skipped: %s",
                                   path.name, number, e)  # fmt: skip
                    return

    def open(self) -> None:
        """Start the segment new reports go to (after :meth:`replay`)."""
        self._start(self.next_seq)

    def _start(self, first_seq: int, *, sync_dir: bool = True) -> None:
        path = self.folder / f"segment-{first_seq:020d}.log"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._current = first_seq
        if sync_dir:
            fsync_dir(self.folder)

    def append(self, device_id: str, namespace: str, device_class: str, name: str, sample: Any) -> int:
        """Write one report; its sequence number. Raises ``OSError`` (:class:`JournalFull` too) when it cannot."""
        if self._fd is None:
            raise RuntimeError("the health journal is not open")
        if self._bytes >= self.max_bytes:
            raise JournalFull(f"health journal holds {self._bytes} bytes, its bound; the store is not being written")
        seq = self.next_seq
        body = json.dumps(
            {"seq": seq, "device_id": device_id, "namespace": namespace, "device_class": device_class,
             "name": name, "sample": encode_sample(sample)},
            separators=(",", ":"),
        ).encode()  # fmt: skip
        line = b"%08x %s\n" % (zlib.crc32(body), body)
        written = os.write(self._fd, line)
        if written != len(line):
            # A disk full part-way: cut the torn line off again, or the next line would be glued to
            # it and replay would stop there, losing every report after it.
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
            raise OSError(f"health journal: wrote {written} of {len(line)} bytes")
        with self._size_lock:
            self._bytes += written
        self.next_seq = seq + 1
        return seq

    def rotate(self) -> int | None:
        """Close the current segment (synced) and start the next; the closed one's first sequence number."""
        if self._fd is None or self._current is None:
            return None
        closed = self._current
        if self.next_seq == closed:
            return None  # nothing in it: keep writing there
        old_fd, self._fd = self._fd, None  # never left naming a closed descriptor, if the open below fails
        self._sealing.append(old_fd)
        self._start(self.next_seq, sync_dir=False)
        return closed

    def seal(self) -> None:
        """Sync and close the segments :meth:`rotate` closed (outside the caller's lock: fsync is slow)."""
        while self._sealing:
            fd = self._sealing.pop()
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(self.folder)

    def discard_closed(self) -> None:
        """Delete every segment but the current one (called once all they hold is in the store).

        Called by the flushing thread without the service's lock (unlinks and a folder fsync are
        slow); the size count it shares with :meth:`append` has a lock of its own.
        """
        removed = False
        for path in self._segments():
            if int(_SEGMENT.match(path.name)[1]) != self._current:  # type: ignore[index]
                size = path.stat().st_size
                path.unlink()
                removed = True
                with self._size_lock:
                    self._bytes -= size
        if removed:
            fsync_dir(self.folder)

    def close(self) -> None:
        self.seal()
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
