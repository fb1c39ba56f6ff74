"""``m2kt broker serve --workers N``: several broker processes behind one port, on Postgres and S3.

Every request is served whichever worker accepts its connection; a subscriber on one worker sees what
was published through another (Postgres LISTEN/NOTIFY, as across replicas); a stop signal stops them all;
a worker that dies takes the broker down with it rather than leaving it short-handed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from m2kt.benchmarks.harness.brokers import BrokerProcess, register_node, s3_env, unique
from m2kt.benchmarks.harness.packets import packet_bytes
from tests.conftest import LiveBroker
from tests.test_broker_pubsub import read_sse


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def workers(
    live_broker: LiveBroker, broker_database: str, broker_bucket: str, s3_server, tmp_path: Path
) -> BrokerProcess:
    env = {
        "M2KT_DATABASE_URL": broker_database,
        "M2KT_STORAGE_URL": f"s3://{broker_bucket}",
        "M2KT_DATA_DIR": str(tmp_path),
        "M2KT_POLL_FALLBACK_SECONDS": "60",  # wake-ups must come from NOTIFY, not from polling
        "M2KT_UPLOAD_RATE_PER_MINUTE": "0",
        **s3_env(s3_server),
    }
    broker = BrokerProcess(env, log_path=tmp_path / "broker.log", workers=2).start()
    assert broker.proc is not None
    # The parent listens before it forks, so the port answers before both workers exist: wait for them
    # (a hang guard only, not a time limit).
    deadline = time.monotonic() + 600
    while len(children(broker.proc.pid)) < 2 and broker.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    yield broker
    broker.stop()


def test_workers_need_postgres(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).with_name("m2kt"))
    env = {**os.environ, "M2KT_DATA_DIR": str(tmp_path)}
    env.pop("M2KT_DATABASE_URL", None)
    done = subprocess.run(
        [exe, "broker", "serve", "--port", "0", "--workers", "2"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 2, done.stderr
    assert "several workers need PostgreSQL" in done.stderr


def test_two_workers_serve_one_port_and_wake_each_others_subscribers(
    workers: BrokerProcess, live_broker: LiveBroker, tmp_path: Path
) -> None:
    assert workers.proc is not None
    pids = children(workers.proc.pid)
    assert len(pids) == 2, pids
    admin = {"Authorization": f"Bearer {live_broker.admin_token}"}
    answered: set[int] = set()
    for _ in range(200):  # fresh connections until both workers have answered one
        r = httpx.get(f"{workers.url}/v1/admin/stats", headers=admin, timeout=60)
        assert r.status_code == 200, r.text
        answered.add(r.json()["process"])
        if len(answered) == 2:
            break
    assert answered == set(pids), (answered, pids)

    teacher = register_node(workers.url, live_broker.admin_token, "teacher")
    student = register_node(workers.url, live_broker.admin_token, "student", with_key=False)
    assert teacher.key is not None
    topic = unique("workers")

    def publish(seed: int) -> str:  # each on a connection of its own: the kernel spreads them over the workers
        r = httpx.post(
            f"{workers.url}/v1/topics/{topic}/packets",
            content=packet_bytes(tmp_path, teacher.key, topic, seed=seed),
            headers={"Authorization": f"Bearer {teacher.token}"},
            timeout=60,
        )
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    publish(0)  # the topic exists; the subscriber starts after its first event
    received: list = []
    ready = threading.Event()
    reader = threading.Thread(
        target=read_sse,
        args=(f"{workers.url}/v1/topics/{topic}/events", student.token, 20, 600, received),
        kwargs={"ready": ready, "after": 1},
    )
    reader.start()
    assert ready.wait(60)
    ids = [publish(seed) for seed in range(1, 21)]
    reader.join(600)
    assert [seq for seq, *_ in received] == list(range(2, 22))
    assert [data["packet"]["id"] for _, _, data, _ in received] == ids


def test_a_stop_signal_stops_every_worker(workers: BrokerProcess) -> None:
    assert workers.proc is not None
    pids = children(workers.proc.pid)
    workers.proc.send_signal(signal.SIGTERM)
    assert workers.proc.wait(timeout=60) == 0
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


def test_a_worker_that_dies_stops_the_broker(workers: BrokerProcess) -> None:
    assert workers.proc is not None
    first, second = children(workers.proc.pid)
    os.kill(first, signal.SIGKILL)
    assert workers.proc.wait(timeout=60) != 0  # the supervisor (systemd, compose) restarts the whole broker
    assert not alive(second)
