"""Generate the ``m2kt`` CLI reference (``docs/cli.md``) from the CLI's own ``--help``.

python -m m2kt.cli.reference            # rewrite docs/cli.md (and README.md's marked block, if it has one)
python -m m2kt.cli.reference --check    # exit 1 with a diff when either is out of date

The help of every command and subcommand is rendered by Click itself, as plain text at a fixed width, so the
output does not depend on the terminal, on colour, or on Rich. ``tests/test_cli_reference.py`` fails when the
committed file differs from what this produces.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository: client/cli/reference.py
DEFAULT_OUT = ROOT / "docs" / "cli.md"
DEFAULT_README = ROOT / "README.md"
PROG = "m2kt"
WIDTH = 100
START_MARKER = "<!-- cli-reference:start -->"
END_MARKER = "<!-- cli-reference:end -->"
REGENERATE = "python -m m2kt.cli.reference"

# A Click command as Typer builds it (Typer may vendor Click, so this is duck-typed: name, help, hidden,
# commands for groups, context_class, get_help).
Command = Any


@dataclass(frozen=True)
class Entry:
    """One command of the tree: its full path (``m2kt key register``) and its Click object."""

    path: tuple[str, ...]
    command: Command
    parent: Entry | None = None

    @property
    def name(self) -> str:
        return " ".join(self.path)

    @property
    def anchor(self) -> str:
        """The GitHub heading slug of ``## `m2kt key register` `` (``m2kt-key-register``)."""
        return "-".join(self.path).lower()

    @property
    def depth(self) -> int:
        return len(self.path) - 1


def root_command() -> Command:
    """The Click group behind ``m2kt.cli.main:app`` (all sub-apps registered)."""
    import typer.main

    from m2kt.cli.main import app

    return typer.main.get_command(app)


def subcommands(command: Command) -> list[tuple[str, Command]]:
    """A group's visible subcommands, sorted by name; none for a plain command."""
    children = getattr(command, "commands", None) or {}
    return [(name, children[name]) for name in sorted(children) if not getattr(children[name], "hidden", False)]


def walk(command: Command, path: tuple[str, ...] = (PROG,), parent: Entry | None = None) -> list[Entry]:
    """Every command of the tree, depth first, each group before its subcommands."""
    entry = Entry(path, command, parent)
    entries = [entry]
    for name, child in subcommands(command):
        entries += walk(child, (*path, name), entry)
    return entries


def _context(entry: Entry) -> Any:
    """A Click context for ``entry`` at a fixed width, so the usage line shows the full command path."""
    parent = _context(entry.parent) if entry.parent else None
    return entry.command.context_class(
        entry.command, parent=parent, info_name=entry.path[-1], terminal_width=WIDTH, max_content_width=WIDTH
    )


def portable(text: str) -> str:
    """Replace machine-specific paths (checkout, user config dir, home) with stable placeholders."""
    from platformdirs import user_config_dir

    replacements = {
        str(ROOT): ".",
        os.getcwd(): ".",
        user_config_dir(PROG): "<user config dir>",
        str(Path.home()): "~",
    }
    for path in sorted(replacements, key=len, reverse=True):
        if len(path) > 1:
            text = text.replace(path, replacements[path])
    return text


def help_text(entry: Entry) -> str:
    """The command's ``--help`` as plain text (Rich formatting off), without trailing spaces."""
    if hasattr(entry.command, "rich_markup_mode"):
        entry.command.rich_markup_mode = None  # Typer's switch to Click's plain formatter; a fresh object each run
    text = entry.command.get_help(_context(entry))
    return portable("\n".join(line.rstrip() for line in text.splitlines()))


def summary(entry: Entry) -> str:
    """The first paragraph of the command's help, on one line."""
    text = (getattr(entry.command, "help", None) or "").strip()
    return " ".join(text.split("\n\n")[0].split())


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (no pipes, no HTML, no emphasis)."""
    for char, escaped in (("\\", "\\\\"), ("|", "\\|"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*")):
        text = text.replace(char, escaped)
    return text


def render_table(entries: list[Entry], link: str = "") -> str:
    """A table of all commands with their one-line help, each linked to ``{link}#anchor``."""
    rows = ["| Command | What it does |", "| --- | --- |"]
    rows += [f"| [`{e.name}`]({link}#{e.anchor}) | {_cell(summary(e))} |" for e in entries]
    return "\n".join(rows) + "\n"


def render_section(entry: Entry) -> str:
    """One command: a heading, links to its subcommands, and its help in a fenced block."""
    lines = [f"## `{entry.name}`", ""]
    children = [f"[`{entry.name} {name}`](#{entry.anchor}-{name.lower()})" for name, _ in subcommands(entry.command)]
    if children and entry.depth > 0:  # the root's are the table above
        lines += ["Subcommands: " + ", ".join(children) + ".", ""]
    lines += ["```text", help_text(entry), "```", ""]
    return "\n".join(lines)


def render_reference(entries: list[Entry]) -> str:
    """The whole of ``docs/cli.md``."""
    header = [
        f"# `{PROG}` command reference",
        "",
        f"<!-- Generated by `{REGENERATE}` from the CLI's own --help; do not edit by hand. -->",
        "",
        "Every command's `--help`, generated from the CLI itself. Regenerate with",
        f"`{REGENERATE}`; `tests/test_cli_reference.py` fails when this file is out of date.",
        "Exit codes are listed in the docstring of `client/cli/app.py` (`m2kt.cli.app`).",
        "",
        "## Commands",
        "",
        render_table(entries),
    ]
    return "\n".join(header + [render_section(e) for e in entries]).rstrip("\n") + "\n"


def render_readme_block(entries: list[Entry], link: str = "docs/cli.md") -> str:
    """What goes between README.md's markers: the command table, linked into the full reference."""
    return f"\n\n{render_table(entries, link)}\nFull help of every command: [{link}]({link}).\n\n"


def replace_block(text: str, block: str) -> str | None:
    """``text`` with the part between the cli-reference markers replaced; None when the markers are absent."""
    start = text.find(START_MARKER)
    end = text.find(END_MARKER, start + len(START_MARKER)) if start >= 0 else -1
    if start < 0 or end < 0:
        return None
    return text[: start + len(START_MARKER)] + block + text[end:]


def diff(path: Path, old: str, new: str) -> str:
    """A unified diff from the file as it is to the text it should have."""
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{path} (committed)", "generated"))


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def targets(out: Path, readme: Path | None) -> dict[Path, str]:
    """Each file this generator owns, with the text it should have."""
    entries = walk(root_command())
    wanted = {out: render_reference(entries)}
    if readme is not None:
        updated = replace_block(_read(readme), render_readme_block(entries))
        if updated is not None:
            wanted[readme] = updated
    return wanted


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name if __spec__ else 'm2kt.cli.reference'}")
    parser.add_argument("--check", action="store_true", help="Exit 1 with a diff when a file is out of date.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="The reference to write (docs/cli.md).")
    parser.add_argument(
        "--readme",
        type=Path,
        default=DEFAULT_README,
        help=f"Markdown file whose {START_MARKER} … {END_MARKER} block gets the command table (if it has both).",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, compare) the generated files; 0 when up to date, 1 when not, 2 on a bad setup."""
    args = _parse(argv)
    if importlib.util.find_spec("fastapi") is None:
        print(
            "the reference covers `m2kt broker`: install the broker extra (pip install 'm2kt[broker]')", file=sys.stderr
        )
        return 2
    stale = [(path, text) for path, text in targets(args.out, args.readme).items() if _read(path) != text]
    for path, text in stale:
        if args.check:
            sys.stdout.write(diff(path, _read(path), text))
            print(f"{path} is out of date; regenerate it with: {REGENERATE}", file=sys.stderr)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
