"""The ``m2kt`` command.

Exit codes (stable, for scripts):

* 0 — success (for ``verify``: the packet is valid);
* 1 — a packet was refused (malformed, failed verification here, refused by the broker's checks, or
  rolled back by ``ingest``'s verifier and safety auditor);
* 2 — usage error (bad options or arguments);
* 3 — a file could not be used (missing, unreadable, bad key file);
* 4 — the broker refused the request (authentication, permission, not found, conflict);
* 5 — the broker is unreachable or unavailable (after retries);
* 6 — a ``subscribe --exec`` handler failed (that packet is not acknowledged).

Errors are one line on stderr.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from client import __version__
from client.keys import KeyFileError, generate_keypair, load_verify_key
from client.manifest import manifest_json_schema
from client.packet import PacketError, PacketHeader, packet_id, read_header, verify_packet

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_FILE, EXIT_BROKER, EXIT_UNAVAILABLE, EXIT_HANDLER = 0, 1, 2, 3, 4, 5, 6

app = typer.Typer(
    name="m2kt",
    help="M2KT: signed knowledge packets between models — keys, packets, broker and nodes.",
    no_args_is_help=True,
    add_completion=False,
)
packet_app = typer.Typer(help="Inspect, verify and describe knowledge packets.", no_args_is_help=True)
app.add_typer(packet_app, name="packet")

if importlib.util.find_spec("fastapi") is not None:  # the server parts are an extra: m2kt[broker]
    from broker.cli import app as broker_app
else:  # pragma: no cover - exercised only without the extra
    broker_app = typer.Typer(help="Broker commands (install the extra: pip install 'm2kt[broker]').")

    @broker_app.callback(invoke_without_command=True)
    def _missing_broker() -> None:
        fail(EXIT_USAGE, "the broker is not installed here: pip install 'm2kt[broker]'")


app.add_typer(broker_app, name="broker")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(code: int, message: str) -> NoReturn:
    err.print(message, markup=False)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        out.print(f"m2kt {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    broker: Annotated[
        str | None, typer.Option("--broker", envvar="M2KT_URL", help="Broker URL (default: from `m2kt login`).")
    ] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="M2KT_TOKEN", help="API token.")] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """M2KT command line."""
    ctx.obj = {"broker": broker, "token": token}


@app.command()
def keygen(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write NAME.key and NAME.pub into.")],
    name: Annotated[str, typer.Option("--name", help="Base name of the key files.")],
    fmt: Annotated[str, typer.Option("--format", help="Key file encoding: pem or raw (base64).")] = "pem",
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing key files.")] = False,
) -> None:
    """Generate an Ed25519 signing key pair (private key written with mode 0600)."""
    if fmt not in ("pem", "raw"):
        fail(EXIT_USAGE, f"--format must be 'pem' or 'raw', not {fmt!r}")
    try:
        paths = generate_keypair(out_dir, name, fmt=fmt, overwrite=force)  # type: ignore[arg-type]
    except (KeyFileError, OSError) as exc:
        fail(EXIT_FILE, f"keygen failed: {exc}")
    out.print(f"private key: {paths.private}")
    out.print(f"public key:  {paths.public}")
    out.print(f"fingerprint: {paths.fingerprint}")


def _describe(header: PacketHeader, path: Path) -> dict[str, Any]:
    m = header.manifest
    return {
        "file": str(path),
        "id": packet_id(path),
        "size": header.file_size,
        "verified": False,
        "manifest": m.model_dump(mode="json"),
    }


@packet_app.command("inspect")
def packet_inspect(
    file: Annotated[Path, typer.Argument(help="Packet file (.m2kt).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest and id as JSON.")] = False,
) -> None:
    """Show what a packet says it holds (structure checked; signature NOT checked — use verify)."""
    try:
        header = read_header(file)
    except OSError as exc:
        fail(EXIT_FILE, f"{file}: {exc.strerror or exc}")
    except PacketError as exc:
        fail(EXIT_REFUSED, f"malformed: {exc.code}: {exc.message}")
    info = _describe(header, file)
    if as_json:
        out.print(json.dumps(info, indent=2, sort_keys=True), markup=False)
        return
    m = header.manifest
    out.print(f"[bold]{file}[/bold]  ({info['size']:,} bytes)")
    out.print(f"id           {info['id']}")
    out.print(f"topic        {m.topic}")
    out.print(f"teacher      {m.teacher.model_name} · {m.teacher.architecture} · d_T={m.teacher.d_model}")
    out.print(f"signed by    {m.key_fingerprint}  [yellow](not verified; run `m2kt packet verify`)[/yellow]")
    out.print(f"created      {m.created_at.isoformat()}")
    out.print(
        f"data usage   {m.data_usage.probe_count} probes · {m.data_usage.teacher_forward_passes} teacher "
        f"forward passes · {m.data_usage.labelled_examples} labelled examples"
    )
    out.print(
        f"extraction   concepts: {m.extraction.concepts.method}"
        + "".join(
            f" · {k}: {getattr(m.extraction, k).method}"
            for k in ("attention", "traces", "graph")
            if getattr(m.extraction, k)
        )
    )
    out.print(
        f"safety       {m.safety.scorer} {m.safety.version}"
        + (f" (threshold {m.safety.threshold})" if m.safety.threshold is not None else "")
    )
    out.print(f"parents      {', '.join(m.parents) if m.parents else '—'}")
    tensors = Table("tensor", "dtype", "shape", "bytes", title="tensors", title_justify="left")
    for t in header.tensors:
        tensors.add_row(
            t.name, t.dtype, "×".join(map(str, t.shape)) or "scalar", f"{t.data_offsets[1] - t.data_offsets[0]:,}"
        )
    out.print(tensors)
    concepts = Table("#", "id", "label", "kind", "safety", title=f"concepts ({len(m.concepts)})", title_justify="left")
    for i, c in enumerate(m.concepts[:20]):
        concepts.add_row(str(i), c.id, c.label, c.kind, f"{c.safety_score:.3f}")
    out.print(concepts)
    if len(m.concepts) > 20:
        out.print(f"… and {len(m.concepts) - 20} more (use --json)")


@packet_app.command("verify")
def packet_verify(
    file: Annotated[Path, typer.Argument(help="Packet file (.m2kt).")],
    key: Annotated[list[Path], typer.Option("--key", help="Trusted public key file; repeat to trust several.")],
) -> None:
    """Verify structure, digest, signature and finiteness; exit 0 when valid, 1 with one line when not."""
    try:
        keys = [load_verify_key(k) for k in key]
    except KeyFileError as exc:
        fail(EXIT_FILE, f"key: {exc}")
    try:
        result = verify_packet(file, keys)
    except OSError as exc:
        fail(EXIT_FILE, f"{file}: {exc.strerror or exc}")
    except PacketError as exc:
        fail(EXIT_REFUSED, f"invalid: {exc.code}: {exc.message}")
    m = result.manifest
    out.print(
        f"valid: {file} topic={m.topic} concepts={len(m.concepts)} signed-by={result.key.fingerprint[:16]}…",
        markup=False,
    )


@packet_app.command("schema")
def packet_schema() -> None:
    """Print the JSON Schema of the signed manifest (m2kt.manifest)."""
    sys.stdout.write(json.dumps(manifest_json_schema(), indent=2, sort_keys=True) + "\n")


import client.cli_bench  # noqa: E402,F401 - registers `m2kt bench`
import client.cli_demo  # noqa: E402,F401 - registers `m2kt demo`
import client.cli_node  # noqa: E402,F401 - registers the model commands (pack) on `app`
import client.cli_remote  # noqa: E402,F401 - registers the broker-facing commands on `app`

if __name__ == "__main__":  # pragma: no cover
    app()
