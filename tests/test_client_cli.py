"""The `m2kt` commands against a live broker, and their documented exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from m2kt.benchmarks.harness.brokers import register_node, unique
from m2kt.benchmarks.harness.packets import make_body, make_tensors
from m2kt.benchmarks.harness.services import free_port
from m2kt.cli.app import EXIT_BROKER, EXIT_HANDLER, EXIT_REFUSED, EXIT_UNAVAILABLE
from m2kt.cli.main import app  # the app with every command registered
from m2kt.format import write_packet
from tests.cli_session import env, m2kt, runner  # noqa: F401 - env is a fixture
from tests.conftest import LiveBroker

M2KT = str(Path(sys.executable).with_name("m2kt"))


def test_admin_teacher_student_workflow(live_broker: LiveBroker, env: dict[str, str], tmp_path: Path) -> None:
    admin = live_broker.admin_token
    result = m2kt("node", "add", unique("t"), "--role", "teacher", "--json", token=admin, env=env)
    assert result.exit_code == 0, result.output
    teacher_token = json.loads(result.output)["token"]["token"]
    keys = runner.invoke(app, ["keygen", "--out", str(tmp_path / "keys"), "--name", "teacher"])
    assert keys.exit_code == 0
    assert m2kt("key", "register", str(tmp_path / "keys" / "teacher.key"), token=teacher_token, env=env).exit_code == 0

    from m2kt.format.keys import load_signing_key

    topic = unique("cli")
    key = load_signing_key(tmp_path / "keys" / "teacher.key")
    parent = write_packet(tmp_path / "a.m2kt", make_body(topic=topic), make_tensors(seed=1), key)
    result = m2kt("publish", str(parent.path), "--topic", topic, "--json", token=teacher_token, env=env)
    assert result.exit_code == 0, result.output
    pid = json.loads(result.output)["id"]
    child = write_packet(tmp_path / "b.m2kt", make_body(topic=topic, parents=[pid]), make_tensors(seed=2), key)
    cid = m2kt("publish", str(child.path), "-t", topic, token=teacher_token, env=env).output.split()[0]

    # login stores the student's token; later commands need no --token
    student = json.loads(m2kt("node", "add", unique("s"), "--role", "student", "--json", token=admin, env=env).output)
    login = runner.invoke(
        app, ["login", live_broker.url, "--token", student["token"]["token"]], env={"M2KT_CONFIG": env["M2KT_CONFIG"]}
    )
    assert login.exit_code == 0 and "logged in" in login.output
    plain = {"M2KT_CONFIG": env["M2KT_CONFIG"]}
    listed = json.loads(runner.invoke(app, ["packets", topic, "--json"], env=plain).output)
    assert [i["packet"]["id"] for i in listed["items"]] == [pid, cid]
    assert topic in runner.invoke(app, ["topics"], env=plain).output
    lineage = json.loads(runner.invoke(app, ["lineage", cid, "--json"], env=plain).output)
    assert [a["id"] for a in lineage["ancestors"]] == [pid]
    fetched = runner.invoke(app, ["fetch", cid, "--out", str(tmp_path / "in")], env=plain)
    assert fetched.exit_code == 0 and (tmp_path / "in" / f"{cid}.m2kt").read_bytes() == child.path.read_bytes()

    # exit codes
    missing = runner.invoke(app, ["fetch", "0" * 64, "--out", str(tmp_path / "x")], env=plain)
    assert missing.exit_code == EXIT_BROKER and "packet_not_found" in missing.output
    untrusted = runner.invoke(app, ["fetch", cid, "--out", str(tmp_path / "y"), "--trust", "f" * 64], env=plain)
    assert untrusted.exit_code == EXIT_REFUSED and "untrusted_key" in untrusted.output
    quarantine = runner.invoke(app, ["packet", "quarantine", cid], env=plain)
    assert quarantine.exit_code == EXIT_BROKER and "insufficient_scope" in quarantine.output
    assert m2kt("packet", "quarantine", cid, token=admin, env=env).output.strip().endswith("quarantined")
    assert m2kt("packet", "release", cid, token=admin, env=env).output.strip().endswith("accepted")
    revoked = m2kt("key", "revoke", key.fingerprint, "--reason", "rotated", token=teacher_token, env=env)
    assert revoked.exit_code == 0 and "2 packet(s) revoked" in revoked.output


def test_unreachable_broker_exits_5(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["--broker", f"http://127.0.0.1:{free_port()}", "--token", "x", "topics"],
        env={"M2KT_CONFIG": str(tmp_path / "c.json")},
    )
    assert result.exit_code == EXIT_UNAVAILABLE and "broker unavailable" in result.output


HANDLER = """
import pathlib, sys, time
log, mode, packet = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
with log.open("a") as f:
    f.write(packet.name + "\\n")
if mode == "hang" and len(log.read_text().split()) == 3:
    time.sleep(60)  # killed here, while handling the 3rd packet
if mode == "fail":
    sys.exit(3)
"""


def test_subscriber_killed_mid_stream_resumes_without_loss(
    live_broker: LiveBroker, env: dict[str, str], tmp_path: Path
) -> None:
    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher")
    student = register_node(live_broker.url, live_broker.admin_token, "student", with_key=False)
    topic = unique("killsub")
    ids = []
    for s in range(5):
        path = write_packet(tmp_path / f"{s}.m2kt", make_body(topic=topic), make_tensors(seed=s), teacher.key).path
        ids.append(teacher.http.post(f"/v1/topics/{topic}/packets", content=path.read_bytes()).json()["id"])
    handler = tmp_path / "handler.py"
    handler.write_text(HANDLER)
    log = tmp_path / "handled.log"
    proc_env = {**os.environ, **env, "M2KT_TOKEN": student.token}
    cmd = [M2KT, "subscribe", topic, "--name", "w", "--out", str(tmp_path / "in"), "--quiet"]
    proc = subprocess.Popen(
        [*cmd, "--exec", f"{sys.executable} {handler} {log} hang"],
        env=proc_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while (not log.exists() or len(log.read_text().split()) < 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the subscriber and its handler, mid-packet
    proc.wait()
    assert [n.removesuffix(".m2kt") for n in log.read_text().split()] == ids[:3]

    resumed = subprocess.run(
        [*cmd, "--once", "--exec", f"{sys.executable} {handler} {log} ok"],
        env=proc_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    handled = [n.removesuffix(".m2kt") for n in log.read_text().split()]
    assert handled == ids[:3] + ids[2:]  # the 3rd again (never acknowledged), then the rest: none lost

    failing = subprocess.run(
        [*cmd[:4], "w2", *cmd[5:], "--once", "--exec", f"{sys.executable} {handler} {log} fail"],
        env=proc_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failing.returncode == EXIT_HANDLER and "not acknowledged" in failing.stderr


def test_empty_answers_say_so_and_ids_are_never_cut(
    live_broker: LiveBroker, env: dict[str, str], tmp_path: Path
) -> None:
    """Issue 19: ``subscribe --once`` with nothing new, an empty event page and a packet with no relatives each
    print a line saying so; a packet id in a table printed to a pipe (80 columns) is printed whole."""
    admin = live_broker.admin_token
    teacher = json.loads(m2kt("node", "add", unique("t"), "--role", "teacher", "--json", token=admin, env=env).output)
    teacher_token = teacher["token"]["token"]
    assert runner.invoke(app, ["keygen", "--out", str(tmp_path / "keys"), "--name", "t"]).exit_code == 0
    assert m2kt("key", "register", str(tmp_path / "keys" / "t.key"), token=teacher_token, env=env).exit_code == 0
    topic = unique("empty")
    from m2kt.format.keys import load_signing_key

    written = write_packet(
        tmp_path / "a.m2kt", make_body(topic=topic), make_tensors(seed=3), load_signing_key(tmp_path / "keys" / "t.key")
    )
    pid = m2kt("publish", str(written.path), "-t", topic, token=teacher_token, env=env).output.split()[0]
    student = json.loads(m2kt("node", "add", unique("s"), "--role", "student", "--json", token=admin, env=env).output)
    token = student["token"]["token"]
    sub = ["subscribe", topic, "--name", unique("n"), "--out", str(tmp_path / "in"), "--once", "--quiet"]
    first = m2kt(*sub, token=token, env=env)
    assert first.exit_code == 0 and f"published  {pid}" in first.output, first.output
    again = m2kt(*sub, token=token, env=env)
    assert again.exit_code == 0 and again.output.strip() == f"nothing new on {topic} for subscription {sub[3]}"
    assert m2kt("packets", topic, "--after", "1", token=token, env=env).output.strip() == (
        f"no events on {topic} after seq 1"
    )
    assert m2kt("lineage", pid, token=token, env=env).output.strip() == f"{pid}: no ancestors and no descendants"
    piped = subprocess.run(
        [M2KT, "packets", topic],
        env={**os.environ, **env, "M2KT_TOKEN": token, "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert piped.returncode == 0 and pid in piped.stdout, piped.stdout + piped.stderr
