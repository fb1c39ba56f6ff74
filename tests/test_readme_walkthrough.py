"""The README's command-line walkthrough, run as written: every command a subprocess of one bash, in an empty
directory with a copy of ``examples/``; each ``# → text`` line under a command must appear in its output.

Only the port changes (a free one instead of 8000) and the user config goes to a temporary file. A command
that fails, or a documented line that no longer appears, fails the test with that step's output.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from m2kt.benchmarks.harness.services import free_port

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD = 3600  # seconds; a hang guard, not a time limit (training is minutes on a busy 2-core machine)


@dataclass
class Step:
    command: str
    expect: list[str] = field(default_factory=list)


def walkthrough_steps(readme: str) -> list[Step]:
    """The commands between the walkthrough markers, with the ``# →`` lines that follow each."""
    block = re.search(r"<!-- walkthrough:start -->\s*```bash\n(.*?)```\s*<!-- walkthrough:end -->", readme, re.S)
    assert block, "README.md has no walkthrough block"
    steps: list[Step] = []
    pending = ""
    for line in block.group(1).splitlines():
        if pending:
            pending += "\n" + line
            if not line.endswith("\\"):
                steps.append(Step(pending))
                pending = ""
            continue
        stripped = line.strip()
        if stripped.startswith("# →"):
            assert steps, "an expected-output line before any command"
            steps[-1].expect.append(stripped.removeprefix("# →").strip())
        elif stripped and not stripped.startswith("#"):
            if stripped.endswith("\\"):
                pending = line
            else:
                steps.append(Step(line))
    return steps


def test_walkthrough_parses_into_the_documented_commands() -> None:
    steps = walkthrough_steps((ROOT / "README.md").read_text())
    commands = " ".join(s.command for s in steps)
    for needed in (
        "broker serve",
        "login",
        "node add",
        "key register",
        "train-tiny",
        "pack",
        "publish",
        "subscribe",
        "fetch",
        "ingest",
        "--suite",
        "--receipt",
        "receipts",
        "lineage",
    ):
        assert needed in commands, needed
    assert sum(len(s.expect) for s in steps) >= 10


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    steps = walkthrough_steps((ROOT / "README.md").read_text())
    work = tmp_path / "walk"
    work.mkdir()
    shutil.copytree(ROOT / "examples", work / "examples")
    port = str(free_port())
    script = ["set -u"]
    for i, step in enumerate(steps):
        command = step.command.replace("8000", port)
        script += [
            f"{{ {command}\n}} > step-{i}.out 2>&1",
            "rc=$?",
            f"echo $rc > step-{i}.rc",
            f"if [ $rc -ne 0 ]; then kill %1 2>/dev/null; exit {min(100 + i, 250)}; fi",
        ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("M2KT_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        M2KT_CONFIG=str(tmp_path / "config.json"),
        HF_HUB_OFFLINE="1",
        COLUMNS="200",
    )
    proc = subprocess.Popen(
        ["bash", "-c", "\n".join(script)],
        cwd=work,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        proc.communicate(timeout=HANG_GUARD)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:  # the broker started with & may outlive a failed step
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for i, step in enumerate(steps):
        out_file, rc_file = work / f"step-{i}.out", work / f"step-{i}.rc"
        assert rc_file.exists(), f"step {i} never ran: {step.command}"
        output = out_file.read_text()
        broker_log = (work / "broker.log").read_text()[-3000:] if (work / "broker.log").exists() else ""
        assert rc_file.read_text().strip() == "0", f"step {i} failed: {step.command}\n{output}\nbroker:\n{broker_log}"
        for expected in step.expect:
            assert expected in output, f"step {i}: {step.command}\nexpected {expected!r} in:\n{output}"
    assert proc.returncode == 0
