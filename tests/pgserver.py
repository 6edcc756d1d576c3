"""A throwaway Postgres for tests: Debian's server package, a cluster made with `initdb` in
a temporary directory and started on a free loopback port (as the `postgres` user when
the tests run as root: initdb refuses root). One per test session; each test that needs a
clean database gets its own with `fresh_database()`."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path


def _bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"Postgres' {name} is not installed (scripts/setup.sh --test "
                           "installs Debian's postgresql package)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="flowc-pg-"))
        self.data, self.sockets = self.root / "data", self.root / "sock"
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            os.chmod(self.root, 0o755)
        for d in (self.data, self.sockets):
            d.mkdir()
            if self._as:
                shutil.chown(d, "postgres", "postgres")
        self._run(_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")
        self.start()

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        """Start on ``self.port``; a first start that finds its free port taken since it was
        picked tries another (a restart keeps the port the tests' URLs name)."""
        for attempt in range(5):
            try:
                self._run(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.data / "log"),
                          "-w", "-o", f"-p {self.port} -k {self.sockets} "
                          "-c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                          "start")
                self.started = True
                return
            except subprocess.CalledProcessError:
                if getattr(self, "started", False) or attempt == 4:
                    raise
                self.port = _free_port()

    def stop(self, mode: str = "fast") -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def fresh_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
