"""``erasus-ray fl ...``: the client-side and operator-side commands of federated deletion.

``erasus-ray fl request --client client-2 --ids 3,17,42`` files a deletion request in the client's outbox; the
client's SuperNode hands it to the server on the next ``query.delete`` and files the server's acknowledgement under
``<outbox>/<client>/acked/``. ``--level class --label 3`` / ``--level client`` for the other levels. With
``--ledger URL`` the request goes straight into the server's ledger instead (the operator's console), validated
against the federation's partition registry (``--benchmark``, ``--n-clients``, ``--scheme``, ``--seed``) and the same
:class:`~erasus_ray.ledger.RequestLimits` as the server's ``query.delete`` path (``--max-ids``,
``--max-requests-per-minute``; defaults: the server's ``ServerConfig``). The ledger records it as an operator action:
submitted at the console by the OS user (``actor`` ``console:<user>``) on behalf of ``--client``, never as if the client
had asked. A shared ledger (PostgreSQL, or one with an operator key set: ``erasus-ray ledger set-operator-key``) takes
it only with the operator key, read from ``$ERASUS_RAY_OPERATOR_KEY`` (never from the command line, where other users
could read it).

``erasus-ray fl simulate --n-clients 10 --state-dir fl-state --outbox outbox`` runs the ServerApp and ClientApp
under Flower's simulation runtime (a subprocess) and prints the ledger.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid

from erasus_ray.errors import InvalidConfigError


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ids must be comma-separated integers, got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    fl = sub.add_parser("fl", help="federated deletion with Flower: file requests, run a simulation")
    fl_sub = fl.add_subparsers(dest="fl_command", required=True)

    req = fl_sub.add_parser("request", help="file a deletion request for a client (outbox) or the operator (ledger)")
    req.add_argument("--client", required=True, help="requesting client id, e.g. client-2 (or 'operator' with --ledger)")
    req.add_argument("--ids", type=_ids, default=None, help="sample level: comma-separated dataset ids, e.g. 3,17,42")
    req.add_argument("--level", choices=["sample", "class", "client"], default=None, help="default: sample if --ids else client")
    req.add_argument("--label", type=int, default=None, help="class level: the label to forget")
    req.add_argument("--request-id", default=None, help="idempotency key (default: a new uuid)")
    req.add_argument("--reason", default="", help="free text for the audit trail")
    req.add_argument("--outbox", default=None, help="outbox root (default: $ERASUS_FL_OUTBOX)")
    req.add_argument("--ledger", default=None,
                     help="submit to this ledger URL directly: an operator action on behalf of --client (a shared ledger "
                          "needs the operator key in $ERASUS_RAY_OPERATOR_KEY)")
    req.add_argument("--benchmark", default="digits")
    req.add_argument("--scenario", default="class")
    req.add_argument("--n-clients", type=int, default=10)
    req.add_argument("--scheme", default="iid")
    req.add_argument("--seed", type=int, default=0)
    req.add_argument("--max-ids", type=int, default=None,
                     help="with --ledger: most ids per request (default: the server's ServerConfig.max_ids)")
    req.add_argument("--max-requests-per-minute", type=int, default=None,
                     help="with --ledger: the client's rate limit, counted from the ledger (default: the server's; 0 disables)")
    req.set_defaults(func=cmd_request)

    sim = fl_sub.add_parser("simulate", help="run federated training and deletion under Flower's simulation runtime")
    sim.add_argument("--n-clients", type=int, default=10)
    sim.add_argument("--rounds", type=int, default=5)
    sim.add_argument("--benchmark", default="digits")
    sim.add_argument("--scheme", default="iid")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--strategy", default="grad_diff")
    sim.add_argument("--selector", default="el2n")
    sim.add_argument("--fraction", type=float, default=1.0)
    sim.add_argument("--state-dir", default="fl-state")
    sim.add_argument("--outbox", default="fl-outbox")
    sim.set_defaults(func=cmd_simulate)


def cmd_request(args: argparse.Namespace) -> int:
    from erasus_ray.ledger import DeletionRequest

    level = args.level or ("sample" if args.ids else ("class" if args.label is not None else "client"))
    request = DeletionRequest(
        request_id=args.request_id or f"{args.client}-{uuid.uuid4().hex[:12]}",
        client_id=args.client,
        level=level,
        ids=args.ids if level == "sample" else None,
        label=args.label if level == "class" else None,
        reason=args.reason,
    )
    if args.ledger:
        from erasus_ray.federated.coordinator import ServerConfig
        from erasus_ray.federated.messages import FederationSpec
        from erasus_ray.federated.partition import build_ownership, load_federation
        from erasus_ray.ledger import OPERATOR_KEY_ENV, DeletionLedger, RequestLimits

        server = ServerConfig()
        rpm = server.max_requests_per_minute if args.max_requests_per_minute is None else args.max_requests_per_minute
        if rpm < 0:
            raise InvalidConfigError(f"--max-requests-per-minute must be >= 0 (0 disables), got {rpm}")
        max_ids = server.max_ids if args.max_ids is None else args.max_ids
        if max_ids < 1:
            raise InvalidConfigError(f"--max-ids must be a positive integer, got {max_ids}")
        limits = RequestLimits(max_ids=max_ids, max_requests_per_minute=rpm or None)
        fed = load_federation(FederationSpec(args.benchmark, args.scenario, args.seed, args.n_clients, args.scheme))
        with DeletionLedger(args.ledger, operator_key=os.environ.get(OPERATOR_KEY_ENV) or None) as ledger:
            entry = ledger.submit(request, ownership=build_ownership(fed.partitions, fed.labels), limits=limits)
        print(json.dumps({"request_id": entry.request_id, "state": entry.state, "code": entry.error_code, "reason": entry.state_reason,
                          "actor": entry.actor, "on_behalf_of": entry.client_id}))
        return 0 if entry.state != "rejected" else 3
    from erasus_ray.federated.client_app import submit_to_outbox

    path = submit_to_outbox(request, root=args.outbox)
    print(json.dumps({"request_id": request.request_id, "state": "queued", "outbox": str(path)}))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from erasus_ray.federated.simulation import run_simulation_subprocess
    from erasus_ray.ledger import DeletionLedger

    config = {
        "n-clients": args.n_clients, "rounds": args.rounds, "benchmark": args.benchmark, "scheme": args.scheme,
        "seed": args.seed, "strategy": args.strategy, "selector": args.selector, "fraction": args.fraction,
    }
    result = run_simulation_subprocess(config, state_dir=args.state_dir, outbox=args.outbox)
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr)
        return result.returncode
    from pathlib import Path

    with DeletionLedger(f"sqlite:///{Path(args.state_dir) / 'ledger.db'}") as ledger:
        for entry in ledger.entries():
            m = entry.metrics or {}
            print(f"{entry.request_id:24s} {entry.level:7s} {entry.state:10s} forget_acc {m.get('before_forget_acc', float('nan')):.3f}"
                  f" -> {m.get('after_forget_acc', float('nan')):.3f} (retrain {m.get('after_gold_forget_acc', float('nan')):.3f})"
                  f"{'  ' + entry.state_reason if entry.state_reason else ''}")
    return 0
