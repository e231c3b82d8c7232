"""``erasus-ray serve``: run the deletion service on Ray Serve (``--config serve.yaml``), and ``serve keys add`` to
create a client's or the operator's API key (printed once; only its hash is stored in the ledger)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from erasus_ray.serve.config import ServeConfig


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the deletion service (Ray Serve + FastAPI): see examples/serve.yaml")
    serve.add_argument("--config", default=None, help="serve YAML (default: the embedded defaults: digits, SQLite, 127.0.0.1:8321)")
    serve.add_argument("--check", action="store_true", help="validate the config and exit")
    serve.add_argument("--standalone", action="store_true",
                       help="serve without Ray: uvicorn and the unlearning worker in this process (one machine)")
    serve.set_defaults(func=cmd_serve)
    serve_sub = serve.add_subparsers(dest="serve_command")
    keys = serve_sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_sub.add_parser("add", help="create (or replace) an API key and print it once")
    add.add_argument("client_id")
    add.add_argument("--role", default="client", choices=["client", "operator"])
    add.add_argument("--config", dest="keys_config", default=None, help="serve YAML whose ledger holds the key")
    add.set_defaults(func=cmd_keys_add)


def _load(path: str | None) -> ServeConfig:
    config = ServeConfig() if path is None else ServeConfig.load(path)
    config.validate()
    return config


def cmd_keys_add(args: argparse.Namespace) -> int:
    from pathlib import Path

    from erasus_ray.ledger import DeletionLedger
    from erasus_ray.serve.keys import ClientKeys

    config = _load(args.keys_config or args.config)
    Path(config.state_dir).mkdir(parents=True, exist_ok=True)
    with DeletionLedger(config.ledger_url) as ledger:
        print(ClientKeys(ledger).add(args.client_id, role=args.role))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if args.check:
        print(f"serve config OK: {config.benchmark} on {config.url}, ledger {config.ledger_url}")
        return 0
    if args.standalone:
        from erasus_ray.serve.standalone import run_standalone

        print(f"erasus-ray serve --standalone: {config.url} (Ctrl-C stops)", file=sys.stderr)
        run_standalone(config)
        return 0
    import ray
    from ray import serve

    from erasus_ray.serve.app import build, http_options

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False)
    # SIGTERM (systemd, Kubernetes, kill) ends like Ctrl-C: atexit's ray.shutdown() stops the cluster this started.
    # Set after ray.init, whose own SIGTERM handler dumps a stack and aborts (exit 134).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve.start(http_options=http_options(config))
    print(f"erasus-ray serve: {config.url} (Ctrl-C stops)", file=sys.stderr)
    serve.run(build(config), name="erasus", route_prefix="/", blocking=True)
    return 0
