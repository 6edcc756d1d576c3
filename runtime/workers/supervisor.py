"""`flowc serve --workers N`: N server processes on one port, one ledger writer.

One Python process serves a few thousand requests a second on one core; a machine with
more cores runs more processes. They must still behave as one server, so the supervisor
(this process, which serves no requests) is the ledger's only owner (hub.py): every
worker sends its rows, queries, runs, key changes, budget reservations and rate-limit
checks to it over a Unix socket (link.py). N writers racing for the DuckDB file would
leave all but one writing segments.

The port: by default the supervisor binds it once and every worker accepts from that one
socket (the pre-fork model, as uvicorn's and gunicorn's workers do); `--listen reuseport`
gives each worker its own SO_REUSEPORT socket and the kernel spreads connections over
them (docs/benchmarks.md compares the two; a worker killed with its own socket takes the
connections waiting in its queue with it, a shared queue keeps them for the others).

With a shared store (`--store`), the store is what the workers share, as separate
instances share it: each worker is an instance of it (worker.py), and no hub runs here.

A worker that exits while the server runs is started again (at most once a second). On
SIGTERM or SIGINT every worker drains (uvicorn's graceful shutdown: in-flight requests
finish, then its rows are sent), then the supervisor writes every row and lets the
ledger go.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from flowc.config import ProjectConfig
from runtime.workers.hub import Hub
from runtime.workers.worker import ServeArgs, listening_socket, run

log = logging.getLogger("flowc.workers")
_RESTART_GAP = 1.0  # seconds between restarts of a worker that keeps exiting
_DRAIN = 20.0  # seconds the workers get to finish at shutdown before they are killed


class Supervisor:
    def __init__(self, args: ServeArgs, config: ProjectConfig, project_dir: Path, n: int,
                 listen: str, admin_key: str | None) -> None:
        self.args, self.n, self.listen = args, n, listen
        self._dir = tempfile.mkdtemp(prefix="flowc-workers-")  # 0700: the hub's socket
        self.address = os.path.join(self._dir, "ledger.sock")
        self.authkey = os.urandom(32)
        # Bound before anything starts, so a port in use is reported at once; in reuseport
        # mode it only holds the port.
        self.sock = listening_socket(args.host, args.port, reuseport=listen != "shared",
                                     listen=listen == "shared")
        self.hub = None if args.store else Hub(config, project_dir, self.address,
                                               self.authkey, admin_key)
        self._ctx = mp.get_context("spawn")  # never fork a process that runs threads
        self.procs: list[Any] = [None] * n
        self._started = [0.0] * n
        self.stopping = False

    def _start(self, i: int) -> None:
        p = self._ctx.Process(
            target=run, name=f"flowc-worker-{i}",
            args=(self.args, self.sock if self.listen == "shared" else None,
                  self.address if self.hub else None, self.authkey if self.hub else None, i))
        p.start()
        self.procs[i] = p
        self._started[i] = time.monotonic()

    def _stop(self, *_: Any) -> None:
        self.stopping = True

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        try:
            for i in range(self.n):
                self._start(i)
            self._watch()
        finally:
            self._drain()
            if self.hub is not None:
                self.hub.close()
            self.sock.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    def _watch(self) -> None:
        due: dict[int, float] = {}  # workers to start again, and when
        while not self.stopping:
            live = {p.sentinel: i for i, p in enumerate(self.procs)
                    if p is not None and p.is_alive()}
            wait(list(live), timeout=0.2)
            now = time.monotonic()
            for i, p in enumerate(self.procs):
                if p is not None and not p.is_alive() and not self.stopping:
                    log.error("worker %d (pid %s) exited with %s; starting it again", i,
                              p.pid, p.exitcode)
                    self.procs[i] = None
                    due[i] = max(now, self._started[i] + _RESTART_GAP)
            for i, when in list(due.items()):
                if now >= when and not self.stopping:
                    del due[i]
                    self._start(i)

    def _drain(self) -> None:
        live = [p for p in self.procs if p is not None and p.is_alive()]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + _DRAIN
        for p in live:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.error("worker pid %s did not stop in %g s; killed", p.pid, _DRAIN)
                p.kill()
                p.join(5)


def serve_workers(args: ServeArgs, config: ProjectConfig, project_dir: Path, n: int,
                  listen: str, admin_key: str | None, url: str) -> None:
    """Run the supervisor until SIGTERM/SIGINT; `.flowc/server.json` names it (its pid)
    for the CLI on this machine."""
    from runtime.server import SERVER_FILE, _write_server_file

    sup = Supervisor(args, config, project_dir, n, listen, admin_key)
    server_file = project_dir / SERVER_FILE
    _write_server_file(server_file, url, admin_key)
    log.info("flowc serving %s with %d workers (%s socket)", url, n, listen)
    try:
        sup.run()
    finally:
        with contextlib.suppress(FileNotFoundError):
            server_file.unlink()
