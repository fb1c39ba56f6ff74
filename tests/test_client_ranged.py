"""Fetching a packet larger than one part: ranged requests from several threads, verified in one pass.

Against a live broker (uvicorn on a socket, Postgres, nanio): through a presigned redirect and through the
broker, the file is the packet bit for bit; a presigned URL that expires mid-download is renewed; a part
that comes back short or altered leaves no file behind."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from m2kt import BrokerClient, VerificationError
from m2kt.benchmarks.harness.brokers import register_node, unique
from m2kt.benchmarks.harness.packets import make_body
from m2kt.errors import M2KTError
from m2kt.format import write_packet
from m2kt.sdk.ranged import PART, parse_content_range, parts_in_order
from tests.conftest import LiveBroker


def test_parts_come_back_in_order_whatever_order_they_finish_in() -> None:
    data = bytes(range(256)) * 1000
    lock, in_flight, most = threading.Lock(), [0], [0]

    def fetch(start: int, end: int) -> bytes:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(random.random() / 200)
        with lock:
            in_flight[0] -= 1
        return data[start:end]

    assert b"".join(parts_in_order(fetch, 100, len(data), part=997, workers=4)) == data[100:]
    assert most[0] <= 4


def test_the_first_failed_part_is_raised() -> None:
    def fetch(start: int, end: int) -> bytes:
        if start >= 3000:
            raise OSError("connection reset")
        return b"x" * (end - start)

    got = []
    with pytest.raises(OSError, match="connection reset"):
        for part in parts_in_order(fetch, 0, 10_000, part=1000, workers=3):
            got.append(part)
    assert len(got) == 3  # the parts before the failure, in order


def test_content_range() -> None:
    assert parse_content_range("bytes 0-99/1000") == (0, 100, 1000)
    assert parse_content_range("bytes 5-4/10") is None and parse_content_range(None) is None
    assert parse_content_range("bytes */1000") is None


@pytest.fixture(scope="module")
def big(live_broker: LiveBroker, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, str]:
    """A ~20 MiB packet (three parts), published once."""
    teacher = register_node(live_broker.url, live_broker.admin_token, "teacher")
    topic = unique("ranged")
    rng = np.random.default_rng(7)
    tensors = {"concepts": rng.standard_normal((4, 8)).astype(np.float32)}
    tensors["traces"] = rng.standard_normal((int(2.5 * PART) // 256, 8, 8)).astype(np.float32)
    path = tmp_path_factory.mktemp("big") / "big.m2kt"
    write_packet(path, make_body(topic=topic), tensors, teacher.key)
    assert path.stat().st_size > 2 * PART
    with BrokerClient(live_broker.url, teacher.token, quiet=True) as publisher:
        packet_id = publisher.publish(path, topic).id
    token = register_node(live_broker.url, live_broker.admin_token, "student", with_key=False).token
    return packet_id, path, token


@pytest.mark.parametrize("redirect", [True, False], ids=["presigned", "through-broker"])
def test_a_large_packet_arrives_whole_and_verified(
    live_broker: LiveBroker, big: tuple[str, Path, str], tmp_path: Path, redirect: bool
) -> None:
    packet_id, source, token = big
    ranges: list[str] = []

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            ranges.append(request.headers.get("range", ""))
            return super().handle_request(request)

    options = {"prefer_redirect": redirect, "download_workers": 4, "transport": Recording()}
    with BrokerClient(live_broker.url, token, quiet=True, **options) as client:
        fetched = client.fetch(packet_id, tmp_path / "in/")
    assert fetched.path.read_bytes() == source.read_bytes()
    assert hashlib.sha256(fetched.path.read_bytes()).hexdigest() == packet_id
    asked = [r for r in ranges if r]
    assert f"bytes=0-{PART - 1}" in asked and len(asked) >= 3, ranges  # the first part, then the others


def test_an_expired_presigned_url_is_renewed_mid_download(
    live_broker: LiveBroker, big: tuple[str, Path, str], tmp_path: Path
) -> None:
    """The first ranged request after the first part finds its URL expired (403): the client asks the broker
    for a fresh one and goes on."""
    packet_id, source, token = big
    expired = {"done": False}

    class Expiring(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            later = request.headers.get("range", "").startswith("bytes=") and not request.headers["range"].startswith(
                "bytes=0-"
            )
            if "X-Amz-Signature" in str(request.url) and later and not expired["done"]:
                expired["done"] = True
                return httpx.Response(403, content=b"<Error><Code>AccessDenied</Code></Error>", request=request)
            return super().handle_request(request)

    with BrokerClient(live_broker.url, token, quiet=True, download_workers=2, transport=Expiring()) as client:
        fetched = client.fetch(packet_id, tmp_path / "in/")
    assert expired["done"] and fetched.path.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("fault", ["short", "flipped"])
def test_a_bad_part_leaves_no_file(
    live_broker: LiveBroker, big: tuple[str, Path, str], tmp_path: Path, fault: str
) -> None:
    packet_id, _, token = big

    class Tamper(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = super().handle_request(request)
            body = response.read()
            if response.status_code == 206 and not request.headers["range"].startswith("bytes=0-"):
                body = body[:-1] if fault == "short" else body[:-1] + bytes([body[-1] ^ 1])
            headers = [(k, v) for k, v in response.headers.items() if k.lower() != "content-length"]
            return httpx.Response(response.status_code, headers=headers, content=body, request=request)

    inbox = tmp_path / "in"
    with BrokerClient(live_broker.url, token, quiet=True, download_workers=3, transport=Tamper()) as client:
        with pytest.raises(M2KTError) as err:
            client.fetch(packet_id, f"{inbox}/")
    if fault == "flipped":
        assert isinstance(err.value, VerificationError) and err.value.code == "digest_mismatch"
    assert not inbox.exists() or list(inbox.iterdir()) == []
