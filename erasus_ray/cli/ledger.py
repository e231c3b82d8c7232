"""``erasus-ray ledger list|show <id>|export``: read the deletion ledger (``--db`` URL or SQLite path);
``set-operator-key``: set or change the key console submissions need (``DeletionLedger.set_operator_key``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from erasus_ray.errors import InvalidConfigError

DEFAULT_DB_ENV = "ERASUS_RAY_LEDGER"


def add_ledger_parser(sub: Any) -> None:
    """Register ``ledger`` and its sub-commands on the top-level sub-parser set."""
    ledger = sub.add_parser("ledger", help="inspect the deletion ledger: list | show <request_id> | export")
    ledger.add_argument(
        "--db",
        default=None,
        help=f"SQLAlchemy URL or SQLite file of the ledger (default: ${DEFAULT_DB_ENV}, else ./erasus-ledger.db)",
    )
    actions = ledger.add_subparsers(dest="ledger_command", required=True)
    lst = actions.add_parser("list", help="one line per request, oldest first")
    lst.add_argument("--state", action="append", default=None, help="only these states (repeatable)")
    lst.add_argument("--client", default=None, help="only this client's requests")
    lst.add_argument("--pending", action="store_true", help="only unfinished requests (what a restarted server resumes)")
    lst.add_argument("--batch", default=None, help="only the requests of this batch (one unlearning round)")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.set_defaults(func=cmd_ledger_list)
    show = actions.add_parser("show", help="one request with its results and every transition")
    show.add_argument("request_id")
    show.add_argument("--hash-ids", action="store_true", help="print the ids' SHA-256 instead of the ids")
    show.set_defaults(func=cmd_ledger_show)
    export = actions.add_parser("export", help="the audit trail as JSON")
    export.add_argument("--out", default=None, help="write to this file (default: print)")
    export.add_argument("--hash-ids", action="store_true", help="replace ids and coreset ids by their SHA-256")
    export.add_argument("--state", action="append", default=None, help="only these states (repeatable)")
    export.set_defaults(func=cmd_ledger_export)
    key = actions.add_parser(
        "set-operator-key",
        help="set or change the operator key: the new key is read from stdin (or made with --generate); changing it "
             "needs the current one in $ERASUS_RAY_OPERATOR_KEY",
    )
    key.add_argument("--generate", action="store_true", help="make a random key and print it once")
    key.set_defaults(func=cmd_ledger_set_operator_key)


#: The first 16 bytes of every SQLite 3 database file.
SQLITE_HEADER = b"SQLite format 3\x00"


def check_ledger_file(path: Path) -> None:
    """A read command must open an existing ledger and write nothing: the file exists, is a SQLite database and holds
    the ledger's tables (checked read-only, so a junk or foreign file is an error here, not a raw ``DatabaseError``
    later, and never gets ledger tables created in it)."""
    import sqlite3

    from erasus_ray.ledger.ledger import meta_table, requests_table

    if not path.is_file():
        raise InvalidConfigError(f"--db: no ledger file at {str(path)!r}")
    with path.open("rb") as fh:
        if fh.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise InvalidConfigError(f"--db: {str(path)!r} is not a SQLite database (not a deletion ledger)")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:
        raise InvalidConfigError(f"--db: cannot read {str(path)!r} as a SQLite database: {err}") from None
    missing = sorted({requests_table.name, meta_table.name} - tables)
    if missing:
        raise InvalidConfigError(f"--db: {str(path)!r} is a SQLite database but not a deletion ledger (no {missing} table)")


def open_ledger(db: str | None) -> Any:
    """Open an existing ledger; a SQLite file that does not exist, or is not a ledger, is an error (a typo must not
    create an empty ledger); a database the ledger cannot open is an :class:`InvalidConfigError` naming ``--db``."""
    from sqlalchemy.exc import SQLAlchemyError

    from erasus_ray.ledger import DeletionLedger

    url = db or os.environ.get(DEFAULT_DB_ENV) or "erasus-ledger.db"
    if "://" not in url:
        check_ledger_file(Path(url).expanduser())
    elif url.startswith("sqlite:///") and url not in ("sqlite:///:memory:",):
        check_ledger_file(Path(url[len("sqlite:///"):]))
    try:
        return DeletionLedger(url)
    except SQLAlchemyError as err:
        raise InvalidConfigError(f"--db: cannot open the ledger at {url!r}: {getattr(err, 'orig', None) or err}") from None


def cmd_ledger_list(args: argparse.Namespace) -> int:
    from erasus_ray.ledger import PENDING_STATES

    with open_ledger(args.db) as ledger:
        states = PENDING_STATES if args.pending else args.state
        entries = ledger.entries(states, client_id=args.client, batch_id=args.batch)
        if args.json:
            print(json.dumps([e.to_dict(hash_ids=True) for e in entries], indent=2))
            return 0
        header = f"{'request_id':<28} {'client':<14} {'level':<7} {'n_ids':>6} {'state':<10} {'batch':<14} {'updated (UTC)':<24} reason"
        print(header)
        for e in entries:
            d = e.to_dict()
            n_ids = "-" if d["n_ids"] is None else str(d["n_ids"])
            what = e.state_reason or ""
            batch = (e.batch_id or "-")[:14]
            print(f"{e.request_id[:28]:<28} {e.client_id[:14]:<14} {e.level[:7]:<7} {n_ids:>6} {e.state:<10} {batch:<14} {d['updated_at'][:23]:<24} {what[:60]}")
        counts = ledger.counts()
        print(f"{len(entries)} request(s); all states: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return 0


def cmd_ledger_show(args: argparse.Namespace) -> int:
    with open_ledger(args.db) as ledger:
        entry = ledger.get(args.request_id)
        doc = entry.to_dict(hash_ids=args.hash_ids)
        doc["transitions"] = [t.to_dict() for t in ledger.history(args.request_id)]
        print(json.dumps(doc, indent=2))
    return 0


def cmd_ledger_export(args: argparse.Namespace) -> int:
    with open_ledger(args.db) as ledger:
        records = ledger.export(args.out, hash_ids=args.hash_ids, states=args.state)
        if args.out is None:
            json.dump(records, sys.stdout, indent=2)
            print()
        else:
            print(f"wrote {len(records)} request(s) to {args.out}")
    return 0


def cmd_ledger_set_operator_key(args: argparse.Namespace) -> int:
    import secrets

    from erasus_ray.ledger import OPERATOR_KEY_ENV

    new_key = secrets.token_urlsafe(24) if args.generate else sys.stdin.readline().strip()
    with open_ledger(args.db) as ledger:
        ledger.set_operator_key(new_key, current=os.environ.get(OPERATOR_KEY_ENV) or None)
    if args.generate:
        print(new_key)
    print(f"operator key set; console submissions now need it in ${OPERATOR_KEY_ENV}", file=sys.stderr)
    return 0
