"""The CLI reference (docs/cli.md, and README.md's marked block if it has one) matches the CLI's own help."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the reference documents `m2kt broker` (the broker extra)")

import typer.main  # noqa: E402

from m2kt.cli import reference as ref  # noqa: E402
from m2kt.cli.main import app  # noqa: E402

FIX = f"regenerate it with `{ref.REGENERATE}` and commit the result"


@pytest.fixture(scope="module")
def entries() -> list[ref.Entry]:
    return ref.walk(ref.root_command())


@pytest.fixture(scope="module")
def generated(entries: list[ref.Entry]) -> str:
    return ref.render_reference(entries)


def _command_paths(command: object, path: tuple[str, ...] = ("m2kt",)) -> list[tuple[str, ...]]:
    """Every visible command of the tree, found independently of the generator's walk."""
    found = [path]
    for name, child in (getattr(command, "commands", None) or {}).items():
        if not getattr(child, "hidden", False):
            found += _command_paths(child, (*path, name))
    return found


def test_reference_is_up_to_date(generated: str) -> None:
    committed = ref.DEFAULT_OUT.read_text(encoding="utf-8") if ref.DEFAULT_OUT.is_file() else ""
    assert committed == generated, (
        f"docs/cli.md is out of date; {FIX}:\n{ref.diff(ref.DEFAULT_OUT, committed, generated)}"
    )


def test_every_command_is_in_the_reference(generated: str) -> None:
    paths = _command_paths(typer.main.get_command(app))
    assert len(paths) > 20 and ("m2kt", "packet", "verify") in paths and ("m2kt", "broker", "serve") in paths
    for path in paths:
        name, anchor = " ".join(path), "-".join(path)
        assert f"\n## `{name}`\n" in generated, f"{name} has no section; {FIX}"
        assert f"(#{anchor})" in generated, f"{name} is not in the table of commands; {FIX}"
        assert f"Usage: {name} " in generated, f"{name}'s help is missing; {FIX}"


def test_reference_is_portable(generated: str) -> None:
    for machine_specific in {str(ref.ROOT), os.getcwd(), str(Path.home())} - {"/"}:
        assert machine_specific not in generated
    assert "\x1b[" not in generated and "╭" not in generated  # no colour, no Rich boxes
    help_lines = [line for block in generated.split("```text")[1:] for line in block.split("```")[0].splitlines()]
    assert help_lines and max(map(len, help_lines)) <= ref.WIDTH  # wrapped at the fixed width, whatever the terminal


def test_readme_block_matches(entries: list[ref.Entry]) -> None:
    readme = ref.DEFAULT_README.read_text(encoding="utf-8")
    expected = ref.replace_block(readme, ref.render_readme_block(entries))
    if expected is None:
        pytest.skip("README.md has no <!-- cli-reference:start/end --> block")
    assert readme == expected, f"README.md's CLI reference block is out of date; {FIX}"


def test_check_reports_drift_and_write_fixes_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, readme, plain = tmp_path / "docs" / "cli.md", tmp_path / "README.md", tmp_path / "PLAIN.md"
    readme.write_text(f"# Title\n\n{ref.START_MARKER}\nstale\n{ref.END_MARKER}\n\nMore.\n", encoding="utf-8")
    plain.write_text("# No markers\n", encoding="utf-8")

    assert ref.main(["--check", "--out", str(out), "--readme", str(readme)]) == 1
    captured = capsys.readouterr()
    assert "+## `m2kt packet verify`" in captured.out and "-stale" in captured.out
    assert f"regenerate it with: {ref.REGENERATE}" in captured.err

    assert ref.main(["--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith(f"# Title\n\n{ref.START_MARKER}\n\n| Command |") and text.endswith(
        f"{ref.END_MARKER}\n\nMore.\n"
    )
    assert "[`m2kt packet verify`](docs/cli.md#m2kt-packet-verify)" in text
    assert ref.main(["--check", "--out", str(out), "--readme", str(readme)]) == 0

    assert ref.main(["--out", str(out), "--readme", str(plain)]) == 0  # no markers: left alone
    assert plain.read_text(encoding="utf-8") == "# No markers\n"
