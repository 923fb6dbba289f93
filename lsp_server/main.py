"""The language server as a program: the server with every handler (`handlers.register`),
logging, stdio or TCP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys

from lsp_server import handlers, transport
from lsp_server.logfile import make_handler
from lsp_server.server import SERVING, UNREPORTED, DiffusionServer, report_to_user
from model.network.families import parse_overrides


def make_server(model_override: dict | None = None) -> DiffusionServer:
    """A fresh server state (settings, documents, backend, stats) with every handler; it is
    the one told of process-wide problems (`report_to_user`) from now on."""
    server = DiffusionServer()
    handlers.register(server)
    server.model_override = model_override or {}
    server.apply_settings(None)
    server.pending_reports.extend(UNREPORTED)
    UNREPORTED.clear()
    SERVING[:] = [server]
    return server


def configure_logging(level: str, log_file: str | None) -> None:
    handler = make_handler(log_file, on_failure=report_to_user)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pygls").setLevel(max(root.level, logging.WARNING))


def serve(args) -> int:
    configure_logging(args.log_level, args.log_file)
    try:
        parse_overrides(args.family_override)
    except ValueError as error:
        print(f"diffusion-lsp serve: {error}", file=sys.stderr)
        return 2
    override = {"model": {key: value for key, value in (
        ("path", args.model), ("family", args.family),
        ("familyOverrides", parse_overrides(args.family_override) or None),
        ("device", None if args.device == "auto" else args.device),
        ("dtype", None if args.dtype == "auto" else args.dtype),
        ("quantization", None if args.quantization == "auto" else args.quantization))
        if value is not None}}
    model_override = override if override["model"] else {}
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # uvloop does not exist on Windows
        pass
    code = 0
    if args.tcp:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(transport.serve_tcp(args.host, args.port,
                                            lambda: make_server(model_override)))
    else:
        code = make_server(model_override).start_io()
    # leave at once: a daemon thread still inside torch (a model loading, a step) aborts the
    # interpreter's teardown ("terminate called without an active exception", exit -6)
    logging.shutdown()
    with contextlib.suppress(OSError, ValueError):  # stdout may be closed already
        sys.stdout.flush()
    os._exit(code)
