"""`mirror-deploy serve`: the deployed pair behind an OpenAI-compatible HTTP endpoint."""
from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from ..decoding.config import MODES, GenerationConfig
from ..errors import MirrorDeployError

log = logging.getLogger("mirror_deploy.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(mode: str | None, port: int, max_queue: int) -> None:
    if mode is not None and mode not in MODES:
        raise MirrorDeployError(f"mode {mode!r} is unknown", f"use one of: {', '.join(MODES)}")
    if not 0 <= port <= 65535:
        raise MirrorDeployError(f"port {port} is out of range", "use a port in 1-65535 (0 picks a free one)")
    if max_queue < 1:
        raise MirrorDeployError("--max-queue must be at least 1", "use e.g. 16")


def serve(folder: Path, host: str = "127.0.0.1", port: int = 8000, mode: str | None = None, profile: str | None = None,
          max_queue: int = 16, model_name: str | None = None, log_level: str = "info", console=None,
          lookup: bool | None = None) -> None:
    """Load the engine, then serve until Ctrl-C (which drains the requests in flight and those queued)."""
    import uvicorn

    from ..decoding.engine import Engine
    from .app import create_app

    check_options(mode, port, max_queue)
    engine = Engine(folder, profile)
    mode = mode or engine.default_mode()[0]   # the tuned best mode, resolved once for every request
    engine.require_draft(mode)                # sd/mirror on a target-only artifact: refused before listening
    GenerationConfig(mode=mode, lookup=lookup).validate()   # --lookup with ar/lookup: refused before listening
    name = model_name or Path(folder).resolve().name
    app = create_app(engine, name, max_queue, mode, lookup)
    if console is not None:
        where = f"http://{host}:{port}/v1" if port else f"{host}, on a free port (uvicorn names it below)"
        beside = {True: " + lookup", False: ", no lookup"}.get(lookup, "")
        console.print(f"serving [bold]{name}[/] ({mode}{beside}) on {where} — Ctrl-C drains and stops")
        if not is_loopback(host):
            console.print(f"[yellow]note:[/] listening on {host}, not only this machine; the API has no "
                          "authentication")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    try:
        server.run()
    except KeyboardInterrupt:   # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
    if console is not None:
        console.print("stopped " + ("at once (second Ctrl-C): requests in flight were cut off" if server.force_exit
                                    else "after finishing the requests in flight"))
