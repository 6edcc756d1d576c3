"""One worker process of `flowc serve --workers N`: the whole server (create_app) with its
ledger, keys and budgets linked to the supervisor (link.py), on the supervisor's socket or
on its own SO_REUSEPORT one. With a shared store (`--store`), each worker is an instance
of it instead, named `<instance>/w<k>` (its rows, its spool), and nothing goes through
the supervisor."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.workers.link import WorkerLink

WORKER_HEADER = b"x-flowc-worker"  # the pid of the worker that answered


@dataclass(frozen=True)
class ServeArgs:
    """What `flowc serve` was given, for each worker to build the same server."""

    host: str
    port: int
    config: Path | None
    pipelines: Path | None
    log_level: str
    allow_hosts: tuple[str, ...]
    allow_origins: tuple[str, ...]
    env: dict[str, str] | None  # with FLOWC_ADMIN_KEY from --admin-key-file, else None
    store: str | None = None  # a shared Postgres: each worker is an instance of it
    instance: str | None = None  # with ``store``: what the workers' names start with


def worker_instance(instance: str, k: int) -> str:
    """Worker ``k``'s instance id in a shared store: its rows' `instance`, and its spool
    (a worker started again in its place takes up what it left there)."""
    return f"{instance}/w{k}"


def listening_socket(host: str, port: int, *, reuseport: bool, listen: bool = True
                     ) -> socket.socket:
    """The port's socket. With ``reuseport`` it joins the port's SO_REUSEPORT group: the
    kernel spreads new connections over the group's listening sockets (a socket that only
    binds holds the port without being handed any)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), port))
    if listen:
        sock.listen(2048)
        sock.set_inheritable(True)
    return sock


class Tagged:
    """Names the answering worker in a response header (`x-flowc-worker: <pid>`), so a
    client or a test can see which process served it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.header = (WORKER_HEADER, str(os.getpid()).encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = self.header

        async def tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, tagged)


def run(args: ServeArgs, sock: socket.socket | None, address: str | None,
        authkey: bytes | None, k: int = 0) -> None:
    """Worker ``k``'s main (a spawned process): serve until SIGTERM/SIGINT, then drain.
    ``address``: the supervisor's hub; None with a shared store."""
    import uvicorn

    from runtime.cli import load_project
    from runtime.http_server import uvicorn_options
    from runtime.server import create_app

    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(levelname)s %(name)s[{os.getpid()}]: %(message)s")
    cfg, project_dir = load_project(args.config)
    link = WorkerLink(address, authkey) if address and authkey else None
    instance = worker_instance(args.instance, k) if args.store and args.instance else None
    app = create_app(cfg, project_dir, pipelines=args.pipelines or project_dir / "pipelines",
                     env=args.env, public_url=None, bind_host=args.host,
                     allow_hosts=args.allow_hosts, allow_origins=args.allow_origins,
                     link=link, store=args.store, instance=instance)
    if sock is None:
        sock = listening_socket(args.host, args.port, reuseport=True)
    server = uvicorn.Server(uvicorn.Config(
        Tagged(app), host=args.host, port=args.port, log_level=args.log_level,
        **uvicorn_options()))
    server.run(sockets=[sock])
