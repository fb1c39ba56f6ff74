"""`m2kt key list / drop`, `m2kt receipts`, and the two mistakes of issue 19, against a live broker (uvicorn on
a socket, PostgreSQL, an S3 server): an admin's key registration without an owner is refused (owner_required),
a key registered under the wrong node is dropped and registered again under the right one (unless it signed
packets: key_in_use), and an admin's token cannot post an ingestion receipt (receipt_needs_student)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from m2kt.benchmarks.harness.brokers import register_node, unique
from m2kt.benchmarks.harness.packets import make_body, make_tensors
from m2kt.broker.models import IngestionReceipt, PublicKey
from m2kt.cli.app import EXIT_BROKER, EXIT_REFUSED
from m2kt.cli.main import app
from m2kt.errors import PermissionDenied
from m2kt.format import write_packet
from m2kt.format.keys import load_signing_key
from m2kt.sdk.client import BrokerClient
from tests.cli_session import env, m2kt, runner  # noqa: F401 - env is a fixture
from tests.conftest import LiveBroker

M2KT = str(Path(sys.executable).with_name("m2kt"))


def keys_of(owner: str, token: str, env: dict[str, str]) -> list[dict[str, object]]:
    result = m2kt("key", "list", "--owner", owner, "--json", token=token, env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


def audit_entries(broker: LiveBroker, action: str, target: str) -> list[dict[str, object]]:
    with broker.admin() as admin:
        rows = admin.get("/v1/admin/audit", params={"limit": 1000}).json()
    return [r for r in rows if r["action"] == action and r["target"] == target]


def publish(token: str, env: dict[str, str], path: Path, topic: str):  # type: ignore[no-untyped-def]
    return m2kt("publish", str(path), "--topic", topic, "--json", "--quiet", token=token, env=env)


def test_a_key_registered_under_the_wrong_node_is_dropped_and_registered_again(
    live_broker: LiveBroker, env: dict[str, str], tmp_path: Path
) -> None:
    admin = live_broker.admin_token
    with live_broker.admin() as http:
        admin_name = http.get("/v1/me").json()["node"]
    created = m2kt("node", "add", unique("teacher"), "--role", "teacher", "--json", token=admin, env=env)
    assert created.exit_code == 0, created.output
    teacher, teacher_token = json.loads(created.output)["node"]["name"], json.loads(created.output)["token"]["token"]
    assert runner.invoke(app, ["keygen", "--out", str(tmp_path / "keys"), "--name", "teacher"]).exit_code == 0
    pub = str(tmp_path / "keys" / "teacher.key")  # registering proves possession: the private key signs
    key = load_signing_key(tmp_path / "keys" / "teacher.key")
    fp = key.fingerprint

    # The newcomer's mistake, refused: logged in as admin, `m2kt key register` names no owner.
    refused = m2kt("key", "register", pub, token=admin, env=env)
    assert refused.exit_code == EXIT_REFUSED, refused.output
    assert "owner_required" in refused.output and "--owner NODE" in refused.output
    with live_broker.admin() as http:
        assert http.get(f"/v1/keys/{fp}").json()["code"] == "key_not_found"  # nothing was registered

    # Registered under the wrong node all the same (explicitly, as the admin's own): the teacher cannot
    # publish with it, cannot take it over, and `key list` shows whose it is, fingerprint in full.
    wrong = m2kt("key", "register", pub, "--owner", admin_name, token=admin, env=env)
    assert wrong.exit_code == 0 and f"registered {fp} for {admin_name}" in wrong.output, wrong.output
    topic = unique("keys.cli")
    first = write_packet(tmp_path / "a.m2kt", make_body(topic=topic), make_tensors(seed=1), key).path
    not_owned = publish(teacher_token, env, first, topic)
    assert not_owned.exit_code == EXIT_REFUSED and "key_not_owned" in not_owned.output, not_owned.output
    taken = m2kt("key", "register", pub, "--owner", teacher, token=admin, env=env)
    assert taken.exit_code == EXIT_BROKER and "key_taken" in taken.output, taken.output
    assert f"m2kt key drop {fp}" in taken.output  # says how to fix it
    listed = m2kt("key", "list", "--owner", admin_name, token=admin, env=env)
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if fp in line)  # the whole 64 hex digits on one line
    assert admin_name in row
    assert [k["fingerprint"] for k in keys_of(teacher, teacher_token, env)] == []

    # Only its owner or an admin may drop it; a missing key is 404.
    student = register_node(live_broker.url, admin, "student", with_key=False)
    student.http.close()
    stranger = m2kt("key", "drop", fp, token=student.token, env=env)
    assert stranger.exit_code == EXIT_BROKER and "insufficient_scope" in stranger.output, stranger.output
    missing = m2kt("key", "drop", "0" * 64, token=admin, env=env)
    assert missing.exit_code == EXIT_BROKER and "key_not_found" in missing.output, missing.output

    # Unused: dropped (audited), then registered again under the teacher, who now publishes with it.
    dropped = m2kt("key", "drop", fp, token=admin, env=env)
    assert dropped.exit_code == 0, dropped.output
    assert len(dropped.output.strip().splitlines()) == 1 and dropped.output.startswith(f"dropped {fp}")
    assert [e["actor"] for e in audit_entries(live_broker, "key.deleted", fp)] == [admin_name]
    assert audit_entries(live_broker, "key.deleted", fp)[0]["detail"] == {"owner": admin_name}
    assert fp not in {k["fingerprint"] for k in keys_of(admin_name, admin, env)}
    again = m2kt("key", "register", pub, "--owner", teacher, token=admin, env=env)
    assert again.exit_code == 0 and f"registered {fp} for {teacher}" in again.output, again.output
    assert [k["fingerprint"] for k in keys_of(teacher, teacher_token, env)] == [fp]
    published = publish(teacher_token, env, first, topic)
    assert published.exit_code == 0, published.output

    # Used: refused with key_in_use (revoke it instead), and the key is still there, unrevoked.
    in_use = m2kt("key", "drop", fp, token=teacher_token, env=env)
    assert in_use.exit_code == EXIT_BROKER and "key_in_use" in in_use.output, in_use.output
    assert "revoke it instead" in in_use.output
    with live_broker.admin() as http:
        r = http.delete(f"/v1/keys/{fp}")
    assert (r.status_code, r.json()["code"]) == (409, "key_in_use")
    [kept] = keys_of(teacher, teacher_token, env)
    assert kept["fingerprint"] == fp and kept["revoked_at"] is None
    with live_broker.state.sessions() as session:  # type: ignore[attr-defined]
        assert session.get(PublicKey, fp) is not None

    # Revoked keys show when and why; the list is whole in a real process writing to a pipe (80 columns).
    assert m2kt("key", "revoke", fp, "--reason", "rotated", token=teacher_token, env=env).exit_code == 0
    piped = subprocess.run(
        [M2KT, "key", "list", "--owner", teacher],
        env={**os.environ, **env, "M2KT_TOKEN": teacher_token, "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr
    row = next(line for line in piped.stdout.splitlines() if fp in line)
    assert teacher in row and "(rotated)" in row
    assert m2kt("key", "list", "--owner", unique("nobody"), token=admin, env=env).output.startswith("no keys")


def test_owners_drop_their_own_unused_keys(live_broker: LiveBroker, env: dict[str, str], tmp_path: Path) -> None:
    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher")
    assert teacher.key is not None
    fp = teacher.key.fingerprint
    teacher.http.close()
    dropped = m2kt("key", "drop", fp, token=teacher.token, env=env)
    assert dropped.exit_code == 0, dropped.output
    assert keys_of(teacher.name, teacher.token, env) == []
    assert [e["actor"] for e in audit_entries(live_broker, "key.deleted", fp)] == [teacher.name]
    # A non-admin still registers its own key without naming an owner, from its private key file.
    pem = tmp_path / "t.key"
    pem.write_text(teacher.key.to_pem())
    pem.chmod(0o600)
    again = m2kt("key", "register", str(pem), token=teacher.token, env=env)
    assert again.exit_code == 0 and f"registered {fp} for {teacher.name}" in again.output, again.output


def receipt_rows(broker: LiveBroker, packet_id: str) -> int:
    with broker.state.sessions() as session:  # type: ignore[attr-defined]
        count = session.scalar(
            select(func.count()).select_from(IngestionReceipt).where(IngestionReceipt.packet_id == packet_id)
        )
    return int(count or 0)


def test_receipts_command_and_admins_cannot_post_receipts(
    live_broker: LiveBroker, env: dict[str, str], tmp_path: Path
) -> None:
    admin = live_broker.admin_token
    teacher = register_node(live_broker.url, admin, "teacher")
    student = register_node(live_broker.url, admin, "student", with_key=False)
    assert teacher.key is not None
    topic = unique("receipts.cli")
    path = write_packet(tmp_path / "p.m2kt", make_body(topic=topic), make_tensors(seed=3), teacher.key).path
    r = teacher.http.post(f"/v1/topics/{topic}/packets", content=path.read_bytes())
    assert r.status_code == 201, r.text
    pid = r.json()["id"]

    empty = m2kt("receipts", pid, token=student.token, env=env)
    assert empty.exit_code == 0 and empty.output.strip() == f"no receipts for {pid}", empty.output
    assert json.loads(m2kt("receipts", pid, "--json", token=student.token, env=env).output) == []
    missing = m2kt("receipts", "0" * 64, token=student.token, env=env)
    assert missing.exit_code == EXIT_BROKER and "packet_not_found" in missing.output

    # The admin's token (what `m2kt ingest --receipt` used while logged in as admin) is refused, with the
    # reason; so is an admin-role node's token that carries the receipt scope itself. Nothing is written.
    with BrokerClient(live_broker.url, admin, quiet=True) as broker, pytest.raises(PermissionDenied) as refused:
        broker.post_receipt(pid, "accepted", {"task": 0.9})
    assert refused.value.status == 403 and refused.value.code == "receipt_needs_student"
    assert "student" in refused.value.message
    with live_broker.admin() as http:
        r = http.post("/v1/nodes", json={"name": unique("admin2"), "role": "admin", "scopes": ["read", "receipt"]})
        assert r.status_code == 201, r.text
    scoped = httpx.post(
        f"{live_broker.url}/v1/packets/{pid}/receipts",
        json={"decision": "accepted"},
        headers={"Authorization": f"Bearer {r.json()['token']['token']}"},
        timeout=30,
    )
    assert (scoped.status_code, scoped.json()["code"]) == (403, "receipt_needs_student")
    assert receipt_rows(live_broker, pid) == 0
    assert m2kt("receipts", pid, token=admin, env=env).output.strip() == f"no receipts for {pid}"

    # A student posts one; a teacher node given the receipt scope still may, too.
    r = student.http.post(f"/v1/packets/{pid}/receipts", json={"decision": "accepted", "scores": {"task": 0.93}})
    assert r.status_code == 201 and r.json()["node"] == student.name, r.text
    reviewer = register_node(live_broker.url, admin, "teacher", scopes=["read", "receipt"], with_key=False)
    r = reviewer.http.post(f"/v1/packets/{pid}/receipts", json={"decision": "rolled_back", "scores": {}})
    assert r.status_code == 201, r.text
    for node in (teacher, student, reviewer):
        node.http.close()
    assert receipt_rows(live_broker, pid) == 2

    listed = m2kt("receipts", pid, token=student.token, env=env)
    assert listed.exit_code == 0, listed.output
    mine = next(line for line in listed.output.splitlines() if student.name in line)
    assert "accepted" in mine and "task=0.93" in mine
    assert any(reviewer.name in line and "rolled_back" in line for line in listed.output.splitlines())
    as_json = json.loads(m2kt("receipts", pid, "--json", token=admin, env=env).output)
    assert [(x["node"], x["decision"], x["scores"]) for x in as_json] == [
        (student.name, "accepted", {"task": 0.93}),
        (reviewer.name, "rolled_back", {}),
    ]
