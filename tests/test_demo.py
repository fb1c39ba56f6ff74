"""`m2kt demo` as a user runs it: a subprocess, its report and its exit code — on the embedded broker,
on an existing broker (Postgres + S3) with --broker, and failing cleanly when the broker is unreachable."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import LiveBroker

M2KT = str(Path(sys.executable).with_name("m2kt"))


# A guard against a hung process, not a speed check: on a loaded 2-core machine one demo run has taken
# 400 s (its trainings alone 386 s), so the limit leaves a wide margin.
HANG = 3600.0


def run_demo(tmp_path: Path, *args: str, timeout: float = HANG) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("M2KT_")}
    return subprocess.run(
        [M2KT, "demo", "--out", str(tmp_path / "demo"), *args],
        env={**env, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_report(result: subprocess.CompletedProcess[str], out: Path) -> dict:  # type: ignore[type-arg]
    assert result.returncode == 0, result.stdout + result.stderr
    for line in ("teacher ", "student ", "% of teacher", "data used", "packet ", "lineage", "written"):
        assert line in result.stdout, (line, result.stdout)
    assert "decision accepted" in result.stdout
    report = json.loads((out / "demo-report.json").read_text())
    assert report["teacher_accuracy"] >= 0.95 and report["decision"] == "accepted"
    assert report["student_after"]["plus"] >= report["student_before"]["plus"] + 0.5  # 'plus' crossed
    assert report["pct_of_teacher"] >= 85.0
    assert report["student_known_after"] >= report["student_known_before"] - 0.02  # add/sub not broken
    assert report["labelled_examples"] == 48 and report["teacher_probes"] == 48  # shared, so counted as labels
    assert [r["decision"] for r in report["receipts"]] == ["accepted"]
    for path in report["written"].values():
        assert Path(path).exists(), path
    return report  # type: ignore[no-any-return]


def test_demo_on_the_embedded_broker(tmp_path: Path) -> None:
    result = run_demo(tmp_path)
    report = check_report(result, tmp_path / "demo")
    assert report["broker"].startswith("http://127.0.0.1:")
    with sqlite3.connect(tmp_path / "demo" / "broker" / "m2kt.db") as db:  # acknowledged once handled
        assert db.execute("SELECT cursor FROM subscriptions WHERE name = 'demo'").fetchone() == (1,)
    assert "starting the embedded broker" in result.stderr


def test_demo_against_an_existing_broker(live_broker: LiveBroker, tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--broker", live_broker.url, "--token", live_broker.admin_token)
    report = check_report(result, tmp_path / "demo")
    assert report["broker"] == live_broker.url and "broker data" not in report["written"]
    packet = live_broker.admin().get(f"/v1/packets/{report['packet_id']}").json()
    assert packet["topic"] == "demo.arith-synonyms" and packet["publisher"].startswith("demo-teacher-")


def test_demo_fails_cleanly(tmp_path: Path) -> None:
    no_token = run_demo(tmp_path, "--broker", "http://127.0.0.1:9")
    assert no_token.returncode != 0 and "needs an admin token" in no_token.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not the demo's")
    refused = subprocess.run(
        [M2KT, "demo", "--out", str(tmp_path / "mine")], capture_output=True, text=True, cwd=tmp_path, timeout=HANG
    )
    assert refused.returncode != 0 and "was not made by m2kt demo" in refused.stderr
    assert (tmp_path / "mine" / "notes.txt").exists()
    down = run_demo(tmp_path, "--broker", "http://127.0.0.1:9", "--token", "m2kt_x" * 5, timeout=HANG)
    assert down.returncode != 0 and "demo failed: registering" in down.stderr, down.stderr
