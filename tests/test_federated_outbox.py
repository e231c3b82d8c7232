"""The client outbox (issue #24 item 3): request and client ids map to file names injectively and every path stays
under its root, so no request overwrites another and no client id reaches another client's folder or outside."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from erasus_ray.errors import InvalidConfigError, InvalidRequestError
from erasus_ray.federated.client_app import client_delete_query, outbox_name, submit_to_outbox
from erasus_ray.federated.messages import DeleteAck, DeleteQuery
from erasus_ray.ledger import DeletionRequest


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_ids_that_differ_only_in_escaped_characters_get_their_own_files(tmp_path: Path) -> None:
    ids = ["r/1", "r_1", "r:1", "r@1", "R_1", "r-1"]
    paths = [submit_to_outbox(DeletionRequest(rid, "client-0", ids=[k]), root=tmp_path) for k, rid in enumerate(ids)]
    assert len(set(paths)) == len(ids) and len({p.name.lower() for p in paths}) == len(ids)  # apart even case-folded
    queued = client_delete_query(DeleteQuery(), "client-0", tmp_path).requests
    assert sorted((r.request_id, r.ids) for r in queued) == sorted((rid, [k]) for k, rid in enumerate(ids))
    # each acknowledgement moves exactly its own request
    left = client_delete_query(DeleteQuery([DeleteAck("r/1", True, "validated")]), "client-0", tmp_path).requests
    assert sorted(r.request_id for r in left) == sorted(set(ids) - {"r/1"})
    acked = [json.loads(p.read_text())["request"]["request_id"] for p in (tmp_path / "client-0" / "acked").iterdir()]
    assert acked == ["r/1"]


def test_the_encoding_is_injective_and_one_safe_path_component() -> None:
    alphabet = "aA0._:@/-"
    seen: dict[str, str] = {}
    for n in range(1, 4):
        for chars in itertools.product(alphabet, repeat=n):
            rid = "".join(chars)
            if not rid[0].isalnum():
                continue
            name = outbox_name(rid)
            assert name.lower() == name and "/" not in name and name not in (".", "..")
            assert name not in seen, (rid, seen.get(name))
            seen[name] = rid
    with pytest.raises(InvalidRequestError, match="shorter id"):
        outbox_name("A" * 128)
    with pytest.raises(InvalidRequestError, match="client_id"):
        outbox_name("../x", "client_id")


@pytest.mark.parametrize("client", ["client-0/../client-3", "client-0/../../x", "client-0/../../../../tmp/x"])
def test_a_client_id_with_dot_dot_stays_one_folder_under_the_root(tmp_path: Path, client: str) -> None:
    root = tmp_path / "outbox"
    (root / "client-3").mkdir(parents=True)
    path = submit_to_outbox(DeletionRequest("r-1", client, ids=[1]), root=root)
    assert path.resolve().parent.parent == root.resolve()  # <root>/<one folder>/<file>
    assert list((root / "client-3").iterdir()) == [] and _files(tmp_path) == [path]
    assert [r.client_id for r in client_delete_query(DeleteQuery(), client, root).requests] == [client]


def test_a_folder_linked_outside_the_root_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "outbox", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "client-0").symlink_to(outside)
    with pytest.raises(InvalidConfigError, match="outside the outbox root"):
        submit_to_outbox(DeletionRequest("r-1", "client-0", ids=[1]), root=root)
    assert list(outside.iterdir()) == []


def test_a_different_request_never_overwrites_a_queued_one(tmp_path: Path) -> None:
    first = submit_to_outbox(DeletionRequest("r-1", "client-0", ids=[1, 2]), root=tmp_path)
    assert submit_to_outbox(DeletionRequest("r-1", "client-0", ids=[2, 1]), root=tmp_path) == first  # the same request
    with pytest.raises(InvalidRequestError) as info:
        submit_to_outbox(DeletionRequest("r-1", "client-0", ids=[3]), root=tmp_path)
    assert info.value.code == "conflict"
    assert json.loads(first.read_text())["ids"] == [1, 2] and _files(tmp_path) == [first]  # no temp file left


def test_cli_request_ids_that_used_to_collide_are_both_queued(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from erasus_ray.cli import main

    out = []
    for rid in ("r/1", "r_1"):
        capsys.readouterr()
        assert main(["fl", "request", "--client", "client-0", "--ids", "1", "--request-id", rid, "--outbox", str(tmp_path)]) == 0
        out.append(json.loads(capsys.readouterr().out)["outbox"])
    assert out[0] != out[1] and all(Path(p).exists() for p in out)
    capsys.readouterr()
    assert main(["fl", "request", "--client", "client-0/../../x", "--ids", "1", "--outbox", str(tmp_path / "o")]) == 0
    assert all(p.resolve().is_relative_to((tmp_path / "o").resolve()) for p in _files(tmp_path / "o"))
