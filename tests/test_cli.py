from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from m2kt.benchmarks.harness.packets import make_body, make_tensors
from m2kt.cli.app import EXIT_FILE, EXIT_REFUSED
from m2kt.cli.main import app  # the app with every command registered
from m2kt.format import write_packet
from m2kt.format.keys import load_signing_key
from m2kt.format.manifest import manifest_json_schema

runner = CliRunner()


@pytest.fixture
def keys_and_packet(tmp_path: Path) -> tuple[Path, Path, Path]:
    result = runner.invoke(app, ["keygen", "--out", str(tmp_path / "keys"), "--name", "teacher"])
    assert result.exit_code == 0, result.output
    assert "fingerprint:" in result.output
    key = load_signing_key(tmp_path / "keys" / "teacher.key")
    packet = write_packet(tmp_path / "p.m2kt", make_body(), make_tensors(), key).path
    return tmp_path / "keys" / "teacher.key", tmp_path / "keys" / "teacher.pub", packet


def test_verify_valid_packet_exits_zero(keys_and_packet) -> None:
    _, pub, packet = keys_and_packet
    result = runner.invoke(app, ["packet", "verify", str(packet), "--key", str(pub)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("valid: ")


def test_verify_tampered_packet_prints_one_line_and_fails(keys_and_packet) -> None:
    _, pub, packet = keys_and_packet
    data = bytearray(packet.read_bytes())
    data[-1] ^= 0x40
    packet.write_bytes(bytes(data))
    result = runner.invoke(app, ["packet", "verify", str(packet), "--key", str(pub)])
    assert result.exit_code == EXIT_REFUSED
    assert result.output.strip().count("\n") == 0
    assert result.output.startswith("invalid: digest_mismatch: ")


def test_verify_with_wrong_key_and_missing_key_file(keys_and_packet, tmp_path: Path) -> None:
    _, _, packet = keys_and_packet
    runner.invoke(app, ["keygen", "--out", str(tmp_path / "other"), "--name", "x"])
    result = runner.invoke(app, ["packet", "verify", str(packet), "--key", str(tmp_path / "other" / "x.pub")])
    assert result.exit_code == EXIT_REFUSED and "unknown_key" in result.output
    result = runner.invoke(app, ["packet", "verify", str(packet), "--key", str(tmp_path / "nope.pub")])
    assert result.exit_code == EXIT_FILE and "no such key file" in result.output


def test_inspect_human_and_json(keys_and_packet) -> None:
    _, _, packet = keys_and_packet
    human = runner.invoke(app, ["packet", "inspect", str(packet)])
    assert human.exit_code == 0 and "arith.mod97" in human.output and "not verified" in human.output
    as_json = runner.invoke(app, ["packet", "inspect", str(packet), "--json"])
    info = json.loads(as_json.output)
    assert info["manifest"]["topic"] == "arith.mod97" and len(info["id"]) == 64 and info["verified"] is False


def test_inspect_malformed_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.m2kt"
    bad.write_bytes(b"not a packet")
    result = runner.invoke(app, ["packet", "inspect", str(bad)])
    assert result.exit_code == EXIT_REFUSED and result.output.startswith("malformed: ")


def test_schema_is_the_manifest_schema() -> None:
    result = runner.invoke(app, ["packet", "schema"])
    assert json.loads(result.output) == manifest_json_schema()


def test_console_script_is_installed(keys_and_packet) -> None:
    _, pub, packet = keys_and_packet
    exe = Path(sys.executable).with_name("m2kt")
    proc = subprocess.run(
        [str(exe), "packet", "verify", str(packet), "--key", str(pub)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_help_shows_no_type_after_an_on_off_flag() -> None:
    """An on/off flag takes no value, so help must not print ``<bool>`` after it (issue 19: ``--migrate true``
    failed because the help suggested a value); options that take one keep their type."""
    from m2kt.cli.main import app as full_app

    for args in (["broker", "serve", "--help"], ["subscribe", "--help"], ["bench", "transfer", "--help"]):
        result = CliRunner().invoke(full_app, args, env={"COLUMNS": "120"})
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output, args
        assert "<int>" in result.output or "<str>" in result.output, args


def test_ingest_template_prints_every_field_and_loads_back(tmp_path: Path) -> None:
    """The config and suite formats are documented by example: the template loads as it is printed."""
    from m2kt.cli.main import app as full_app
    from m2kt.student import IngestConfig, ProbeSuite

    result = CliRunner().invoke(full_app, ["ingest-template"])
    assert result.exit_code == 0, result.output
    template = json.loads(result.output)
    assert IngestConfig.from_json(template["config"]) == IngestConfig()
    assert {"steps", "targets", "cal", "inject", "verifier", "alignment", "rebind"} <= set(template["config"])
    (tmp_path / "suite.json").write_text(json.dumps(template["suite"]))
    assert ProbeSuite.load(tmp_path / "suite.json") == ProbeSuite()
