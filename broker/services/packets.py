"""Reading packets: records, visibility, blob serving, quarantine, lineage, receipts."""

from __future__ import annotations

import json
import re

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from m2kt.broker.caller import Caller
from m2kt.broker.errors import Conflict, Forbidden, NotFound, RangeNotSatisfiable, TooLarge
from m2kt.broker.models import EventKind, IngestionReceipt, LineageEdge, Packet, PacketStatus, Role
from m2kt.broker.schemas import LineageNode, LineageOut, ReceiptIn, ReceiptOut
from m2kt.broker.services import audit
from m2kt.broker.services.topics import append_event
from m2kt.format.manifest import SHA256_PATTERN

MAX_LINEAGE_DEPTH = 64


def get_packet(session: Session, packet_id: str) -> Packet:
    # Not a sha256: no such packet (and no query with text the database would refuse, e.g. NUL).
    packet = session.get(Packet, packet_id) if re.fullmatch(SHA256_PATTERN, packet_id) else None
    if packet is None:
        raise NotFound(f"no packet {packet_id[:64]!r}", code="packet_not_found")
    return packet


def check_servable(packet: Packet, caller: Caller) -> None:
    """Quarantined and revoked packets are served to admins only."""
    if packet.status is not PacketStatus.accepted and not caller.is_admin:
        raise Forbidden(
            f"packet {packet.id[:16]}… is {packet.status.value}; only admins can fetch it",
            code=f"packet_{packet.status.value}",
        )


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` → [start, end) or None for the whole blob."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise RangeNotSatisfiable(
            "only a single 'bytes=' range is supported", headers={"Content-Range": f"bytes */{size}"}
        )
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            start, end = max(size - n, 0), size
        else:
            start = int(first)
            end = int(last) + 1 if last else size
    except ValueError:
        raise RangeNotSatisfiable(f"bad range {header!r}", headers={"Content-Range": f"bytes */{size}"}) from None
    end = min(end, size)
    if start >= size or start >= end or start < 0:
        raise RangeNotSatisfiable(
            f"range {header!r} is outside 0-{size - 1}", headers={"Content-Range": f"bytes */{size}"}
        )
    return start, end


def set_status(session: Session, caller: Caller, packet_id: str, status: PacketStatus) -> Packet:
    """Quarantine (withdraw) or release a packet; subscribers see an event either way."""
    packet = get_packet(session, packet_id)
    if packet.status is PacketStatus.revoked:
        raise Conflict("a revoked packet cannot be quarantined or released", code="packet_revoked")
    if packet.status is status:
        return packet
    packet.status = status
    kind = EventKind.published if status is PacketStatus.accepted else EventKind.quarantined
    append_event(session, packet.topic_id, packet.topic.name, kind, packet.id)
    audit.record(
        session, caller.node_id, f"packet.{'released' if status is PacketStatus.accepted else 'quarantined'}", packet.id
    )
    return packet


def lineage(session: Session, packet_id: str) -> LineageOut:
    get_packet(session, packet_id)

    def walk(start: str, up: bool) -> list[LineageNode]:
        seen: dict[str, int] = {}
        frontier, depth = [start], 0
        while frontier and depth < MAX_LINEAGE_DEPTH:
            depth += 1
            col, other = (
                (LineageEdge.child_id, LineageEdge.parent_id) if up else (LineageEdge.parent_id, LineageEdge.child_id)
            )
            nxt = [p for p in session.scalars(select(other).where(col.in_(frontier))) if p not in seen and p != start]
            for p in nxt:
                seen.setdefault(p, depth)
            frontier = list(dict.fromkeys(nxt))
        nodes = []
        for pid, d in sorted(seen.items(), key=lambda kv: (kv[1], kv[0])):
            row = session.get(Packet, pid)
            nodes.append(
                LineageNode(
                    id=pid,
                    depth=d,
                    known=row is not None,
                    topic=row.topic.name if row else None,
                    status=row.status if row else None,
                )
            )
        return nodes

    return LineageOut(packet=packet_id, ancestors=walk(packet_id, True), descendants=walk(packet_id, False))


def add_receipt(
    session: Session, caller: Caller, packet_id: str, body: ReceiptIn, *, max_bytes: int, max_count: int
) -> ReceiptOut:
    """The caller's 'receipt' scope is checked by the route (ReceiptCaller). A receipt says which node
    ingested the packet, so an admin node (whose 'admin' scope grants 'receipt' too) may not post one.

    A withdrawn (revoked or quarantined) packet takes ``rolled_back`` receipts only: a student says it
    undid the ingestion, never that it took the packet in (409 ``packet_withdrawn``). One receipt's
    scores and report are at most ``max_bytes`` of JSON (413 ``receipt_too_large``), and one node posts
    at most ``max_count`` receipts per packet (409 ``too_many_receipts``)."""
    if caller.role is Role.admin:
        raise Forbidden(
            "receipts record what a student node did; post it with that student's token, not an admin's",
            code="receipt_needs_student",
        )
    packet = get_packet(session, packet_id)
    if packet.status is not PacketStatus.accepted and body.decision != "rolled_back":
        raise Conflict(
            f"packet {packet_id[:16]}… is {packet.status.value}: post 'rolled_back' once you have undone it",
            code="packet_withdrawn",
        )
    size = len(json.dumps([body.scores, body.report], separators=(",", ":")).encode())
    if size > max_bytes:
        raise TooLarge(
            f"the receipt's scores and report are {size} bytes of JSON, over {max_bytes} (M2KT_MAX_RECEIPT_BYTES); "
            "keep the summary, not the whole log",
            code="receipt_too_large",
        )
    posted = session.scalar(
        select(func.count())
        .select_from(IngestionReceipt)
        .where(IngestionReceipt.packet_id == packet_id, IngestionReceipt.node_id == caller.node_id)
    )
    if posted is not None and posted >= max_count:
        raise Conflict(
            f"node {caller.node!r} posted {posted} receipts for this packet already, the most allowed",
            code="too_many_receipts",
        )
    receipt = IngestionReceipt(
        packet_id=packet_id, node_id=caller.node_id, decision=body.decision, scores=body.scores, report=body.report
    )
    session.add(receipt)
    session.flush()
    session.refresh(receipt)
    return receipt_out(receipt)


def receipt_out(r: IngestionReceipt) -> ReceiptOut:
    return ReceiptOut(
        id=r.id,
        packet_id=r.packet_id,
        node=r.node.name,
        decision=r.decision,
        scores=r.scores,
        report=r.report,
        created_at=r.created_at,
    )
