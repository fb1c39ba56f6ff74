"""The ``m2kt`` commands that talk to a broker, on top of the SDK.

Broker and token come from ``--broker`` / ``--token``, else ``M2KT_URL`` / ``M2KT_TOKEN``, else
what ``m2kt login`` stored. Every listing takes ``--json``. Exit codes: see :mod:`m2kt.cli.app`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import BaseModel
from rich.table import Table

from m2kt.cli.app import (
    EXIT_BROKER,
    EXIT_FILE,
    EXIT_HANDLER,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    app,
    fail,
    out,
    packet_app,
)
from m2kt.errors import (
    BrokerError,
    KeyFileError,
    M2KTError,
    MalformedRequest,
    PacketError,
    ServiceUnavailable,
    TransportError,
    ValidationError,
    VerificationError,
)

if TYPE_CHECKING:  # the SDK (httpx) is imported when a command talks to a broker, not to list the commands
    from m2kt.sdk.client import BrokerClient

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]

node_app = typer.Typer(help="Register nodes (admin).", no_args_is_help=True)
key_app = typer.Typer(help="Register, list, revoke and drop signing keys.", no_args_is_help=True)
app.add_typer(node_app, name="node")
app.add_typer(key_app, name="key")


def _print_table(table: Table) -> None:
    """Print at the table's natural width: packet ids and fingerprints are copied from here, so a narrow
    terminal (or a pipe, which rich treats as 80 columns) must not cut them short."""
    from rich.measure import Measurement
    from rich.segment import Segments

    natural = Measurement.get(out, out.options.update(width=10_000), table).maximum
    # Rendered here: Console.print(width=) is capped at the console's width, and its crop would cut lines.
    out.print(Segments(out.render(table, out.options.update(width=max(out.width, natural)))), crop=False)


def _dump(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    return json.dumps(value, indent=2, sort_keys=True, default=str)


@contextmanager
def broker_client(ctx: typer.Context, quiet: bool = False, **kwargs: Any) -> Iterator[BrokerClient]:
    """A client from the global options; SDK errors become one line and a documented exit code."""
    from m2kt.sdk.client import BrokerClient

    options = ctx.obj or {}
    try:
        from m2kt.sdk._base import resolve

        # explicit --broker / --token win over the stored identity (--profile, else the default)
        url, token = resolve(options.get("broker"), options.get("token"), options.get("profile"))
        client = BrokerClient(url, token, quiet=quiet, **kwargs)
    except M2KTError as exc:
        fail(EXIT_BROKER, str(exc))
    try:
        yield client
    except (VerificationError, ValidationError, MalformedRequest) as exc:
        fail(EXIT_REFUSED, f"refused: {exc}")
    except PacketError as exc:
        fail(EXIT_REFUSED, f"refused: {exc.code}: {exc.message}")
    except (TransportError, ServiceUnavailable) as exc:
        fail(EXIT_UNAVAILABLE, f"broker unavailable: {exc}")
    except BrokerError as exc:
        fail(EXIT_BROKER, f"broker refused: {exc}")
    except OSError as exc:
        fail(EXIT_FILE, f"{getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}")
    finally:
        client.close()


@app.command()
def login(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="Broker base URL, e.g. http://127.0.0.1:8000")],
    token: Annotated[
        str, typer.Option("--token", help="This node's API token (m2kt_…).", prompt=True, hide_input=True)
    ],
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile", help="Store it as this named profile (use: m2kt --profile NAME …); else the default."
        ),
    ] = None,
) -> None:
    """Check a token against a broker and remember both (user config dir, mode 0600)."""
    profile = profile or (ctx.obj or {}).get("profile")
    from m2kt.sdk.client import BrokerClient
    from m2kt.sdk.config import save_config

    try:
        with BrokerClient(url, token, quiet=True) as client:
            who = client.me()
    except (TransportError, ServiceUnavailable) as exc:
        fail(EXIT_UNAVAILABLE, f"broker unavailable: {exc}")
    except BrokerError as exc:
        fail(EXIT_BROKER, f"login refused: {exc}")
    path = save_config(url, token, profile)
    where = f"profile {profile!r}" if profile else "the default identity"
    out.print(f"logged in to {url} as {who.node} ({who.role}); saved as {where} in {path}", markup=False)


@app.command()
def publish(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Packet file (.m2kt).", exists=True, dir_okay=False)],
    topic: Annotated[str, typer.Option("--topic", "-t", help="Topic the packet is signed for.")],
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Upload a packet (streamed); prints its id. Publishing the same file again is harmless."""
    with broker_client(ctx, quiet) as broker:
        record = broker.publish(file, topic)
    if as_json:
        out.print(_dump(record), markup=False)
    else:
        out.print(f"{record.id}  {record.status}  topic={record.topic}  {record.size:,} bytes", markup=False)


@app.command()
def fetch(
    ctx: typer.Context,
    packet_id: Annotated[str, typer.Argument(help="Packet id (sha256).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory to place the verified packet in.")],
    trust: Annotated[
        list[str] | None, typer.Option("--trust", help="Only accept packets signed by this key fingerprint (repeat).")
    ] = None,
    no_redirect: Annotated[bool, typer.Option("--no-redirect", help="Download through the broker.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Download a packet, verify it here, then move it into --out (nothing is left if it fails)."""
    with broker_client(
        ctx, quiet, trusted_fingerprints=set(trust) if trust else None, prefer_redirect=not no_redirect
    ) as broker:
        fetched = broker.fetch(packet_id, f"{out_dir}/")
    if as_json:
        out.print(
            _dump(
                {
                    "path": str(fetched.path),
                    "id": fetched.id,
                    "size": fetched.size,
                    "signed_by": fetched.key_fingerprint,
                    "manifest": fetched.manifest.model_dump(mode="json"),
                }
            ),
            markup=False,
        )
    else:
        out.print(f"{fetched.path}  verified (signed by {fetched.key_fingerprint[:16]}…)", markup=False)


@app.command()
def subscribe(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="Topic to follow.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Subscription name; the broker keeps its cursor.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory for verified packets.")],
    once: Annotated[bool, typer.Option("--once", help="Handle what is waiting, then exit.")] = False,
    exec_cmd: Annotated[
        str | None,
        typer.Option("--exec", help="Run CMD PACKET_PATH per packet; a failure stops without acknowledging it."),
    ] = None,
    wait: Annotated[float, typer.Option(help="Long-poll seconds.")] = 25.0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Follow a topic: fetch and verify each packet into --out, in order, resuming where the name left off.

    A revoked or quarantined packet is reported, and a copy already in --out is renamed *.revoked."""
    handled = 0
    with broker_client(ctx, quiet) as broker:
        for delivery in broker.subscribe(topic, name, dest=out_dir, wait=wait, once=once):
            handled += 1
            if delivery.kind != "published":
                held = out_dir / f"{delivery.packet_id}.m2kt"
                if held.exists():
                    held.rename(held.with_name(held.name + ".revoked"))
            if as_json:
                out.print(
                    json.dumps(
                        {
                            "seq": delivery.seq,
                            "event": delivery.kind,
                            "id": delivery.packet_id,
                            "path": str(delivery.path) if delivery.path else None,
                        }
                    ),
                    markup=False,
                )
            else:
                where = delivery.path if delivery.path else "-"
                out.print(f"{delivery.seq}  {delivery.kind}  {delivery.packet_id}  {where}", markup=False)
            if exec_cmd and delivery.path is not None:
                env = {**os.environ, "M2KT_PACKET_ID": delivery.packet_id, "M2KT_EVENT_SEQ": str(delivery.seq)}
                code = subprocess.call([*shlex.split(exec_cmd), str(delivery.path)], env=env)
                if code != 0:
                    fail(EXIT_HANDLER, f"--exec exited with {code} on {delivery.packet_id}; not acknowledged")
    if handled == 0 and not as_json:  # only --once ends without a delivery
        out.print(f"nothing new on {topic} for subscription {name}", markup=False)


@app.command()
def topics(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List topics."""
    with broker_client(ctx) as broker:
        rows = broker.topics()
    if as_json:
        out.print(_dump(rows), markup=False)
        return
    table = Table("topic", "packets", "last seq", "safety threshold")
    for t in rows:
        table.add_row(t.name, str(t.packets), str(t.last_seq), f"{t.effective_safety_threshold:g}")
    if not rows:
        out.print("no topics yet: a topic appears with its first packet", markup=False)
        return
    _print_table(table)


@app.command()
def packets(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="Topic.")],
    after: Annotated[int, typer.Option(help="Only events after this seq.")] = 0,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """A topic's events (published / revoked / quarantined), oldest first."""
    with broker_client(ctx) as broker:
        page = broker.events(topic, after=after, limit=limit)
    if as_json:
        out.print(_dump(page), markup=False)
        return
    table = Table("seq", "event", "packet", "publisher", "status", "bytes")
    for e in page.items:
        table.add_row(str(e.seq), e.kind, e.packet.id, e.packet.publisher, e.packet.status, f"{e.packet.size:,}")
    if not page.items:
        out.print(f"no events on {topic} after seq {after}", markup=False)
        return
    _print_table(table)


@app.command()
def lineage(
    ctx: typer.Context, packet_id: Annotated[str, typer.Argument(help="Packet id.")], as_json: JsonOpt = False
) -> None:
    """A packet's ancestors and descendants."""
    with broker_client(ctx) as broker:
        result = broker.lineage(packet_id)
    if as_json:
        out.print(_dump(result), markup=False)
        return
    table = Table("relation", "depth", "packet", "topic", "status")
    for relation, nodes in (("ancestor", result.ancestors), ("descendant", result.descendants)):
        for n in nodes:
            table.add_row(relation, str(n.depth), n.id, n.topic or "(not on this broker)", n.status or "")
    if not result.ancestors and not result.descendants:
        out.print(f"{packet_id}: no ancestors and no descendants", markup=False)
        return
    _print_table(table)


@node_app.command("add")
def node_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Node name.")],
    role: Annotated[str, typer.Option("--role", help="teacher, student or admin.")],
    scope: Annotated[list[str] | None, typer.Option("--scope", help="Token scope (repeat); default by role.")] = None,
    ttl_days: Annotated[int | None, typer.Option(help="Token lifetime in days.")] = None,
    save_as: Annotated[
        str | None,
        typer.Option(
            "--save-as", help="Also store the new token as this profile here (for a node run on this machine)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a node and print its first API token (shown once)."""
    with broker_client(ctx) as broker:
        created = broker.create_node(name, role, scope, ttl_days)
        url = broker.base_url
    if save_as:
        from m2kt.sdk.config import save_config

        path = save_config(url, created.token.token, save_as)
    if as_json:
        out.print(_dump(created), markup=False)
    else:
        out.print(
            f"node {created.node.name} ({created.node.role}) scopes={','.join(created.token.scopes)}", markup=False
        )
        out.print(f"token: {created.token.token}", markup=False)
        if save_as:
            out.print(f"saved as profile {save_as!r} in {path}: m2kt --profile {save_as} …", markup=False)


def _registration_key(path: Path) -> Any:
    """A private key file (it signs the registration here) or a proof file from ``m2kt key prove``."""
    from m2kt.format.key_proof import KeyProof

    text = path.read_text(errors="replace")[:20000]
    if text.lstrip().startswith("{"):
        try:
            return KeyProof.from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(path, f"not a key proof file (m2kt key prove writes one): {exc}") from None
    if "PUBLIC KEY" in text or path.suffix == ".pub":
        raise KeyFileError(
            path,
            "registering needs the private key (NAME.key): it signs the registration here and only the signature "
            "is sent; an admin registering another node's key uses the proof that node made with `m2kt key prove`",
        )
    return path


@key_app.command("register")
def key_register(
    ctx: typer.Context,
    key_file: Annotated[
        Path,
        typer.Argument(
            help="The private key (NAME.key; it signs the registration, only the signature is sent), or a proof "
            "file from `m2kt key prove`.",
            exists=True,
            dir_okay=False,
        ),
    ],
    owner: Annotated[
        str | None, typer.Option(help="The node the key belongs to; required as admin (else: the calling node).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a key so the broker accepts packets it signs, proving you hold its private key."""
    key = _registration_key(key_file)
    with broker_client(ctx) as broker:
        record = broker.register_key(key, owner)
    out.print(_dump(record) if as_json else f"registered {record.fingerprint} for {record.owner}", markup=False)


@key_app.command("prove")
def key_prove(
    key_file: Annotated[Path, typer.Argument(help="The private key (NAME.key).", exists=True, dir_okay=False)],
    node: Annotated[str, typer.Option(help="The node the key is to be registered for.")],
) -> None:
    """Print a proof that you hold this key, for an admin to register it for NODE (`m2kt key register PROOF
    --owner NODE`); the private key stays here. The broker takes it for a day (M2KT_KEY_PROOF_MAX_AGE_SECONDS)."""
    from m2kt.format.key_proof import prove_key
    from m2kt.format.keys import load_signing_key

    out.print(prove_key(load_signing_key(key_file), node).to_json(), markup=False, end="")


@key_app.command("revoke")
def key_revoke(
    ctx: typer.Context,
    fingerprint: Annotated[str, typer.Argument(help="Key fingerprint.")],
    reason: Annotated[str | None, typer.Option(help="Why (kept in the audit log).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a key: its packets are revoked and subscribers are told."""
    with broker_client(ctx) as broker:
        result = broker.revoke_key(fingerprint, reason)
    out.print(
        _dump(result) if as_json else f"revoked {fingerprint}; {result.packets_revoked} packet(s) revoked", markup=False
    )


def _when(moment: Any) -> str:
    return moment.isoformat(sep=" ", timespec="seconds") if moment is not None else ""


@key_app.command("list")
def key_list(
    ctx: typer.Context,
    owner: Annotated[str | None, typer.Option(help="Only this node's keys.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The key registry, oldest first: fingerprint, owner, when registered, when revoked (why)."""
    with broker_client(ctx) as broker:
        rows = broker.keys(owner)
    if as_json:
        out.print(_dump(rows), markup=False)
        return
    if not rows:
        out.print(f"no keys registered for {owner}" if owner else "no keys registered", markup=False)
        return
    table = Table("fingerprint", "owner", "created", "revoked")
    for k in rows:
        revoked = _when(k.revoked_at) + (f" ({k.revoked_reason})" if k.revoked_at and k.revoked_reason else "")
        table.add_row(k.fingerprint, k.owner, _when(k.created_at), revoked)
    _print_table(table)


@key_app.command("drop")
def key_drop(ctx: typer.Context, fingerprint: Annotated[str, typer.Argument(help="Key fingerprint.")]) -> None:
    """Remove a key that signed no packet, so it can be registered again under the right node.

    For a key registered under the wrong node. The key's owner or an admin may drop it; a key that signed
    packets is refused (key_in_use), since its packets keep their provenance: revoke it instead."""
    with broker_client(ctx) as broker:
        broker.delete_key(fingerprint)
    out.print(f"dropped {fingerprint}; register it again with: m2kt key register FILE.pub --owner NODE", markup=False)


@app.command()
def receipts(
    ctx: typer.Context, packet_id: Annotated[str, typer.Argument(help="Packet id.")], as_json: JsonOpt = False
) -> None:
    """A packet's ingestion receipts: which nodes took it in or rolled it back, with their scores."""
    with broker_client(ctx) as broker:
        rows = broker.receipts(packet_id)
    if as_json:
        out.print(_dump(rows), markup=False)
        return
    if not rows:
        out.print(f"no receipts for {packet_id}", markup=False)
        return
    table = Table("node", "decision", "created", "scores")
    for r in rows:
        scores = ", ".join(f"{name}={value:.4g}" for name, value in sorted(r.scores.items()))
        table.add_row(r.node, r.decision, _when(r.created_at), scores)
    _print_table(table)


@packet_app.command("quarantine")
def packet_quarantine(
    ctx: typer.Context, packet_id: Annotated[str, typer.Argument(help="Packet id.")], as_json: JsonOpt = False
) -> None:
    """Withdraw a packet pending review (admin)."""
    with broker_client(ctx) as broker:
        record = broker.quarantine(packet_id)
    out.print(_dump(record) if as_json else f"{record.id} {record.status}", markup=False)


@packet_app.command("release")
def packet_release(
    ctx: typer.Context, packet_id: Annotated[str, typer.Argument(help="Packet id.")], as_json: JsonOpt = False
) -> None:
    """Release a quarantined packet (admin)."""
    with broker_client(ctx) as broker:
        record = broker.release(packet_id)
    out.print(_dump(record) if as_json else f"{record.id} {record.status}", markup=False)
