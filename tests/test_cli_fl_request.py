"""``erasus-ray fl request --ledger``: the operator's console applies the server's RequestLimits (ids per request and
the per-client rate, counted from the ledger) like the ``query.delete`` path, not only the ownership check."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sqlalchemy")

from erasus_ray.cli import main  # noqa: E402
from erasus_ray.federated.coordinator import ServerConfig  # noqa: E402
from erasus_ray.federated.messages import FederationSpec  # noqa: E402
from erasus_ray.federated.partition import load_federation  # noqa: E402
from erasus_ray.ledger import DeletionLedger  # noqa: E402


def _request(capsys, *argv: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["fl", "request", *argv])
    out = capsys.readouterr().out.strip()
    return code, json.loads(out) if out.startswith("{") else {}


def test_console_requests_obey_the_server_limits(tmp_path, capsys) -> None:
    own = load_federation(FederationSpec(n_clients=10)).partitions["client-2"].tolist()
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    base = ["--client", "client-2", "--ledger", url]

    # max ids: 4 of the client's own ids over --max-ids 3 -> rejected, exit 3; 3 pass
    code, out = _request(capsys, *base, "--ids", ",".join(map(str, own[:4])), "--max-ids", "3", "--request-id", "big")
    assert code == 3 and out["state"] == "rejected" and out["code"] == "too_many_ids" and "at most 3" in out["reason"]
    code, out = _request(capsys, *base, "--ids", ",".join(map(str, own[:3])), "--max-ids", "3", "--request-id", "ok-1")
    assert code == 0 and out["state"] == "validated"
    # the default is the server's: ServerConfig.max_ids (10 000); one more id is refused before any ownership check
    limit = ServerConfig().max_ids
    code, out = _request(capsys, *base, "--ids", ",".join(map(str, range(limit + 1))), "--request-id", "huge")
    assert code == 3 and out["code"] == "too_many_ids" and f"at most {limit}" in out["reason"]

    # the rate limit is counted from the ledger's rows: ok-1 already used the one slot of this minute
    code, out = _request(capsys, *base, "--ids", str(own[5]), "--max-requests-per-minute", "1", "--request-id", "ok-2")
    assert code == 3 and out["code"] == "rate_limited"
    code, out = _request(capsys, *base, "--ids", str(own[5]), "--max-requests-per-minute", "0", "--request-id", "ok-3")
    assert code == 0 and out["state"] == "validated"  # 0 disables it

    capsys.readouterr()
    assert main(["fl", "request", *base, "--ids", str(own[6]), "--max-ids", "0"]) == 2
    assert "--max-ids" in capsys.readouterr().err
    with DeletionLedger(url) as ledger:
        assert {e.request_id: e.state for e in ledger.entries()} == {
            "big": "rejected", "ok-1": "validated", "huge": "rejected", "ok-2": "rejected", "ok-3": "validated",
        }


def test_a_console_request_is_an_operator_action_and_a_shared_ledger_needs_the_key(tmp_path, capsys, monkeypatch) -> None:
    """``fl request --ledger --client client-1`` is recorded as the console's act on behalf of client-1 (not as if
    client-1 had asked); once an operator key is set the console needs it ($ERASUS_RAY_OPERATOR_KEY)."""
    from erasus_ray.ledger.ledger import console_user

    own = load_federation(FederationSpec(n_clients=10)).partitions["client-1"].tolist()
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    base = ["--client", "client-1", "--ledger", url, "--ids", str(own[0])]
    code, out = _request(capsys, *base, "--request-id", "c-1")
    assert code == 0 and out["actor"] == f"console:{console_user()}" and out["on_behalf_of"] == "client-1"
    with DeletionLedger(url) as ledger:
        entry = ledger.get("c-1")
        assert entry.operator_action and entry.submitter == "@console/client-1"

    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("a-long-operator-secret\n"))
    assert main(["ledger", "--db", url, "set-operator-key"]) == 0
    monkeypatch.delenv("ERASUS_RAY_OPERATOR_KEY", raising=False)
    capsys.readouterr()
    assert main(["fl", "request", *base, "--request-id", "c-2"]) == 2
    assert "operator key" in capsys.readouterr().err
    monkeypatch.setenv("ERASUS_RAY_OPERATOR_KEY", "a-long-operator-secret")
    code, out = _request(capsys, *base, "--request-id", "c-2")
    assert code == 0 and out["state"] == "validated"
    with DeletionLedger(url) as ledger:
        assert [e.request_id for e in ledger.entries()] == ["c-1", "c-2"]
