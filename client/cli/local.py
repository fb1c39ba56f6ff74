"""``m2kt`` commands that need only the packet format: ``keygen`` and ``packet inspect | verify | schema``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from m2kt.cli.app import EXIT_FILE, EXIT_REFUSED, EXIT_USAGE, app, fail, out, packet_app
from m2kt.errors import KeyFileError, PacketError

if TYPE_CHECKING:  # the format (numpy, pydantic models) is imported by the commands that read packets
    from m2kt.format.header import PacketHeader


@app.command()
def keygen(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write NAME.key and NAME.pub into.")],
    name: Annotated[str, typer.Option("--name", help="Base name of the key files.")],
    fmt: Annotated[str, typer.Option("--format", help="Key file encoding: pem or raw (base64).")] = "pem",
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing key files.")] = False,
) -> None:
    """Generate an Ed25519 signing key pair (private key written with mode 0600)."""
    from m2kt.format.keys import generate_keypair

    if fmt not in ("pem", "raw"):
        fail(EXIT_USAGE, f"--format must be 'pem' or 'raw', not {fmt!r}")
    try:
        paths = generate_keypair(out_dir, name, fmt=fmt, overwrite=force)  # type: ignore[arg-type]
    except (KeyFileError, OSError) as exc:
        fail(EXIT_FILE, f"keygen failed: {exc}")
    out.print(f"private key: {paths.private}")
    out.print(f"public key:  {paths.public}")
    out.print(f"fingerprint: {paths.fingerprint}")


def safety_summary(m: Any) -> str:
    """The manifest's declared safety scores in one line (``pack`` and ``packet inspect`` print the same)."""
    if m.safety.threshold is None:
        return f"scorer {m.safety.scorer} v{m.safety.version}: no threshold declared"
    flagged = [c.label for c in m.concepts if c.safety_score >= m.safety.threshold]
    return (
        f"scorer {m.safety.scorer} v{m.safety.version}: {len(flagged)} concept(s) at or above threshold "
        f"{m.safety.threshold}" + (f" ({', '.join(flagged)})" if flagged else "")
    )


def _describe(header: PacketHeader, path: Path) -> dict[str, Any]:
    from m2kt.format.verifier import packet_id

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
    from m2kt.format.header import read_header

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
    out.print(f"safety       {safety_summary(m)}", markup=False)
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
    from m2kt.format.keys import load_verify_key
    from m2kt.format.verifier import verify_packet

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


@packet_app.command("id")
def packet_id_command(file: Annotated[Path, typer.Argument(help="Packet file (.m2kt).")]) -> None:
    """Print a packet file's id (the sha256 of the file; what the broker, fetch and lineage call it)."""
    from m2kt.format.verifier import packet_id

    try:
        out.print(packet_id(file), markup=False)
    except OSError as exc:
        fail(EXIT_FILE, f"{file}: {exc.strerror or exc}")


@packet_app.command("schema")
def packet_schema() -> None:
    """Print the JSON Schema of the signed manifest (m2kt.manifest)."""
    from m2kt.format.manifest import manifest_json_schema

    sys.stdout.write(json.dumps(manifest_json_schema(), indent=2, sort_keys=True) + "\n")
