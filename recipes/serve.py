"""Serve an exported bundle over HTTP (FastAPI + uvicorn; ``pip install -e ".[serve]"``).

python recipes/serve.py --bundle bundles/ml-100k [--host 127.0.0.1] [--port 8000] [--max_batch 32] [--max_wait_ms 5] [--answer_cache 100000]

Routes, the page at / and the OpenAPI schema at /docs: README, Serve. Changes (new interactions, new
items) are journaled to --journal (default BUNDLE/journal.jsonl) and replayed at the next start.
"""

from __future__ import annotations

import logging
import socket
import sys
from dataclasses import dataclass, field
from typing import ClassVar

from common.errors import UserError, run_cli
from common.log import setup_logging
from llmrec.config import parse_config

logger = logging.getLogger("serve")


@dataclass
class ServeArgs:
    section: ClassVar[str] = "serve"  # its YAML section (llmrec.config)
    bundle: str = field(default="runs/export", metadata={"help": "bundle written by recipes/export.py"})
    host: str = field(
        default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0: every interface)"}
    )
    port: int = field(default=8000, metadata={"help": "TCP port"})
    max_batch: int = field(
        default=32, metadata={"help": "most cold histories scored in one forward (1: no batching)"}
    )
    max_wait_ms: float = field(
        default=5.0, metadata={"help": "longest a cold history waits for others to share its forward"}
    )
    journal: str | None = field(
        default=None, metadata={"help": "append-only journal of changes (default BUNDLE/journal.jsonl)"}
    )
    warm: bool = field(default=True, metadata={"help": "cache every known user's state before ready"})
    answer_cache: int = field(
        default=100_000,
        metadata={"help": "known-user answers kept until the next change (0: none; each read scores)"},
    )
    max_body_bytes: int = field(
        default=1 << 20, metadata={"help": "largest request body accepted (413 above)"}
    )
    verify: bool = field(default=True, metadata={"help": "check every bundle file's sha256 at load"})
    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda, ... (default: cuda when available)"}
    )


CONFIGS = (ServeArgs,)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    (args,) = parse_config(*CONFIGS, args=argv)
    import uvicorn  # the serving stack loads after parsing: --help answers at once

    from llmrec.server import create_app
    from llmrec.service import Service, check_options

    check_options(args.max_batch, args.max_wait_ms, args.answer_cache)  # one line before anything loads

    def load(registry):
        return Service.open(
            args.bundle,
            args.journal,
            warm=args.warm,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            registry=registry,
            answer_cache=args.answer_cache,
            device=args.device,
            verify=args.verify,
        )

    def stop(err: BaseException) -> None:
        server.should_exit = True

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:  # bound here, so that a taken port is one line before anything loads
        listening = socket.create_server((args.host, args.port), family=family)
    except OSError as err:
        raise UserError(
            f"cannot listen on {args.host}:{args.port} ({err.strerror}); pick another --port"
        ) from err
    app = create_app(load, max_body_bytes=args.max_body_bytes, on_failure=stop)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    logger.info(
        "serving %s on http://%s:%d (ready once /healthz answers 200)", args.bundle, args.host, args.port
    )
    server.run(sockets=[listening])
    if app.state.error is not None:
        raise app.state.error


if __name__ == "__main__":
    sys.exit(run_cli(main))
