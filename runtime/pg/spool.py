"""The local spool: ledger rows on disk until Postgres has them.

Every row is written (one `write(2)`, COPY text format) to the open segment before the
request that made it is answered, so a killed process (kill -9) loses nothing: the row is
in the kernel's page cache. Each segment is fsync'd when it is closed (once per flush
interval), so a machine that loses power loses at most that interval. Closed segments are
sent in order and deleted once Postgres committed them; a restart sends what it finds.

The spool belongs to one instance id: a lock file keeps a second process with the same id
(a mistake, or the killed one's successor before the lock is released) from sharing it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path

_SEGMENT = ".copy"


class SpoolLocked(RuntimeError):
    """Another live process uses this instance's spool."""


class Spool:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise SpoolLocked(f"the spool {folder} is in use by another flowc process: give "
                              "each instance its own id (--instance / FLOWC_INSTANCE)") from None
        self._lock = threading.Lock()
        found = self.segments()
        self._seq = int(found[-1].stem) + 1 if found else 1
        # Rows waiting on disk: those found at start (a previous run's) plus those written.
        self.rows = sum(_lines(p) for p in found)
        self.bytes = sum(p.stat().st_size for p in found)
        self._fd = -1
        self._open_rows = 0
        self._open()

    def _open(self) -> None:
        path = self.folder / f"{self._seq:012d}{_SEGMENT}.open"
        self._seq += 1
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._path = path
        self._open_rows = 0

    @property
    def open_rows(self) -> int:
        """Rows in the segment being written."""
        return self._open_rows

    def append(self, line: bytes) -> None:
        """One row (a complete line), on disk (the page cache) when this returns."""
        with self._lock:
            os.write(self._fd, line)
            self._open_rows += 1
            self.rows += 1
            self.bytes += len(line)

    def seal(self) -> None:
        """Close the open segment (fsync'd) and start another, when it has rows."""
        with self._lock:
            if not self._open_rows:
                return
            fd, path = self._fd, self._path
            self._open()
        os.fsync(fd)
        os.close(fd)
        os.rename(path, path.with_suffix(""))

    def segments(self) -> list[Path]:
        """Closed segments, oldest first; an `.open` one left by a killed process counts
        (its complete lines: `read`)."""
        found = sorted(self.folder.glob(f"*{_SEGMENT}"))
        stale = [p for p in self.folder.glob(f"*{_SEGMENT}.open")
                 if getattr(self, "_path", None) != p]
        for p in stale:  # a previous process's open segment: closed now
            os.rename(p, p.with_suffix(""))
        if stale:
            found = sorted(self.folder.glob(f"*{_SEGMENT}"))
        return found

    def done(self, segments: list[Path], rows: int) -> None:
        """Segments Postgres committed: deleted."""
        size = 0
        for p in segments:
            with contextlib.suppress(FileNotFoundError):
                size += p.stat().st_size
                p.unlink()
        with self._lock:
            self.rows -= rows
            self.bytes -= size

    def close(self) -> None:
        self.seal()
        with self._lock:
            os.close(self._fd)
            if not self._open_rows:
                with contextlib.suppress(FileNotFoundError):
                    self._path.unlink()
        os.close(self._lock_fd)


def read(path: Path) -> tuple[bytes, int]:
    """A segment's complete lines (a torn last line, from a crash mid-write, is left out)
    and how many."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return data[:end], data.count(b"\n", 0, end)


def _lines(path: Path) -> int:
    return read(path)[1]
