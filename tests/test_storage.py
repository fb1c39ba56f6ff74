"""m2kt.broker.storage: the same behaviour from LocalStore and from S3Store against a real S3-protocol server."""

from __future__ import annotations

import hashlib
import random
import re
import threading
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from sqlalchemy import delete

from m2kt.benchmarks.harness.services import S3Server, free_port
from m2kt.broker.db import make_engine
from m2kt.broker.models import InlineBlob
from m2kt.broker.storage import (
    BlobNotFound,
    BlobStore,
    DatabaseStore,
    LocalStore,
    S3Store,
    StorageError,
    TieredStore,
    inline_blobs_stored,
    make_s3_client,
    storage_from_url,
    with_inline_blobs,
)
from m2kt.broker.storage.s3 import PARTS_IN_FLIGHT
from tests.conftest import migrated_database

PART = 5 << 20


SMALL = 64 << 10  # the tiered store's database limit in these tests


@pytest.fixture(scope="session")
def blob_database(postgres_url: str) -> Iterator[str]:
    """A Postgres database of its own for the database store, migrated to head."""
    with migrated_database(postgres_url) as url:
        yield url


@pytest.fixture
def database_blobs(blob_database: str) -> Iterator[DatabaseStore]:
    """A database store on an empty inline_blobs table (limit SMALL)."""
    engine = make_engine(blob_database)
    with engine.begin() as connection:
        connection.execute(delete(InlineBlob))
    yield DatabaseStore(engine, SMALL)
    engine.dispose()


@pytest.fixture(params=["local", "s3", "tiered"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    """The same contract from every store; "tiered": blobs of at most SMALL bytes in Postgres, the rest in S3."""
    if request.param == "local":
        yield LocalStore(tmp_path / "blobs")
        return
    server: S3Server = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    s3 = S3Store(server.client(), bucket, prefix="m2kt/", part_size=PART)
    yield s3 if request.param == "s3" else TieredStore(request.getfixturevalue("database_blobs"), s3)


def s3_of(store: BlobStore) -> S3Store | None:
    """The S3 store holding ``store``'s large blobs, if any."""
    large = store.large if isinstance(store, TieredStore) else store
    return large if isinstance(large, S3Store) else None


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def uneven_chunks(data: bytes) -> Iterator[memoryview]:
    """100 KiB chunks mixed with odd sizes, as memoryviews."""
    sizes = [100 << 10, 1, 4093, 65537, (100 << 10) + 7, 333_333]
    view, offset, i = memoryview(data), 0, 0
    while offset < len(data):
        size = sizes[i % len(sizes)]
        yield view[offset : offset + size]
        offset += size
        i += 1


def put(store: BlobStore, key: str, data: bytes) -> None:
    upload = store.stage()
    upload.write(data)
    upload.complete()
    store.promote(upload.staging_key, key)


def read_all(store: BlobStore, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20) -> bytes:
    return b"".join(store.read(key, start, end, chunk_size=chunk_size))


def keys(store: BlobStore, prefix: str = "") -> list[str]:
    return [info.key for info in store.list(prefix)]


def s3_multipart_etag(data: bytes, part_size: int) -> str:
    parts = [data[i : i + part_size] for i in range(0, len(data), part_size)]
    digest = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    return f'"{digest}-{len(parts)}"'


# ---- round trips ---------------------------------------------------------------------------------


def test_large_upload_in_uneven_chunks_round_trips_through_promote(store: BlobStore) -> None:
    data = payload(12 << 20)
    upload = store.stage()
    assert upload.staging_key.startswith("incoming/") and len(upload.staging_key) == len("incoming/") + 32
    for piece in uneven_chunks(data):
        upload.write(piece)
    assert upload.bytes_written == len(data)
    upload.complete()
    if (s3 := s3_of(store)) is not None:
        # Staged as a multipart upload whose parts are exactly part_size long (the last one shorter).
        head = s3.client.head_object(Bucket=s3.bucket, Key=s3.prefix + upload.staging_key)
        assert head["ETag"] == s3_multipart_etag(data, PART)
    assert not store.exists("packets/big.m2kt")

    store.promote(upload.staging_key, "packets/big.m2kt")

    digest = hashlib.sha256()
    for chunk in store.read("packets/big.m2kt"):
        digest.update(chunk)
    assert digest.digest() == hashlib.sha256(data).digest()
    assert store.size("packets/big.m2kt") == len(data)
    assert store.exists("packets/big.m2kt")
    assert not store.exists(upload.staging_key)
    assert keys(store, "incoming/") == []


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="zero-bytes"),
        pytest.param(b"x", id="one-byte"),
        pytest.param(payload(100_000), id="100-kB"),
        pytest.param(payload(PART), id="exactly-one-part"),
        pytest.param(payload(2 * PART), id="exactly-two-parts"),
    ],
)
def test_object_round_trips(store: BlobStore, data: bytes) -> None:
    put(store, "packets/obj.m2kt", data)
    assert read_all(store, "packets/obj.m2kt") == data
    assert store.size("packets/obj.m2kt") == len(data)
    assert keys(store) == ["packets/obj.m2kt"]


def test_write_accepts_any_buffer_as_bytes(store: BlobStore) -> None:
    import array

    words = array.array("I", [1, 2, 3])
    upload = store.stage()
    upload.write(memoryview(words))  # a non-byte memoryview is taken as its raw bytes
    upload.write(bytearray(b"!"))
    upload.complete()
    store.promote(upload.staging_key, "k")
    assert read_all(store, "k") == words.tobytes() + b"!"
    assert upload.bytes_written == 13


# ---- ranges --------------------------------------------------------------------------------------

SIZE = 1000
DATA = payload(SIZE, seed=7)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        pytest.param(0, 4, DATA[0:4], id="head"),
        pytest.param(5, None, DATA[5:], id="from-5-to-end"),
        pytest.param(SIZE - 1, SIZE, DATA[-1:], id="last-byte"),
        pytest.param(100, 300, DATA[100:300], id="middle"),
        pytest.param(0, None, DATA, id="everything"),
        pytest.param(0, SIZE, DATA, id="everything-explicit"),
        pytest.param(990, 5000, DATA[990:], id="end-past-size-is-clamped"),
        pytest.param(SIZE, None, b"", id="start-at-size-is-empty"),
        pytest.param(5000, None, b"", id="start-past-size-is-empty"),
        pytest.param(7, 7, b"", id="empty-range"),
    ],
)
def test_read_returns_the_byte_range_end_exclusive(
    store: BlobStore, start: int, end: int | None, expected: bytes
) -> None:
    put(store, "r", DATA)
    assert read_all(store, "r", start, end) == expected


def test_read_yields_chunks_no_larger_than_chunk_size(store: BlobStore) -> None:
    put(store, "r", DATA)
    chunks = list(store.read("r", 10, None, chunk_size=64))
    assert b"".join(chunks) == DATA[10:]
    assert max(len(c) for c in chunks) <= 64


def test_range_read_of_empty_object_is_empty(store: BlobStore) -> None:
    put(store, "empty", b"")
    assert read_all(store, "empty", 0, 10) == b""
    assert read_all(store, "empty", 3, None) == b""


@pytest.mark.parametrize(
    ("start", "end"),
    [pytest.param(0, None, id="whole"), pytest.param(5, 10, id="range"), pytest.param(3, 3, id="empty")],
)
def test_read_of_missing_key_raises_before_iteration(store: BlobStore, start: int, end: int | None) -> None:
    with pytest.raises(BlobNotFound):
        store.read("packets/missing.m2kt", start, end)  # not iterated: the call itself raises


@pytest.mark.parametrize(("start", "end"), [pytest.param(-1, None, id="negative"), pytest.param(5, 4, id="reversed")])
def test_read_rejects_invalid_ranges(store: BlobStore, start: int, end: int | None) -> None:
    put(store, "r", DATA)
    with pytest.raises(ValueError):
        store.read("r", start, end)


def test_size_of_missing_key_raises_blob_not_found(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        store.size("nope")
    assert not store.exists("nope")


def test_abandoned_read_stream_can_be_closed(store: BlobStore) -> None:
    put(store, "big", payload(3 << 20))
    stream = store.read("big", chunk_size=1 << 20)
    assert len(next(stream)) == 1 << 20
    stream.close()  # type: ignore[attr-defined]
    assert list(stream) == []


# ---- abort ---------------------------------------------------------------------------------------


def assert_nothing_pending(store: BlobStore) -> None:
    """No unfinished S3 multipart upload, no file (or database row) left in incoming/."""
    if (s3 := s3_of(store)) is not None:
        uploads = s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
        assert uploads == []
    assert keys(store, "incoming/") == []


def assert_nothing_stored(store: BlobStore) -> None:
    assert keys(store) == []
    assert_nothing_pending(store)


@pytest.mark.parametrize("size", [pytest.param(1000, id="below-one-part"), pytest.param(PART + 1000, id="multipart")])
@pytest.mark.parametrize("when", ["before-complete", "after-complete", "after-promote"])
def test_abort_removes_everything_staged_and_is_idempotent(store: BlobStore, size: int, when: str) -> None:
    upload = store.stage()
    upload.write(payload(size))
    if when != "before-complete":
        upload.complete()
    if when == "after-promote":
        store.promote(upload.staging_key, "final")
    upload.abort()
    upload.abort()
    if when == "after-promote":
        assert keys(store) == ["final"]  # abort never touches a promoted object
        store.delete("final")
    assert_nothing_stored(store)


def test_write_or_complete_after_abort_or_complete_is_refused(store: BlobStore) -> None:
    upload = store.stage()
    upload.write(b"abc")
    upload.complete()
    with pytest.raises(RuntimeError):
        upload.write(b"more")
    with pytest.raises(RuntimeError):
        upload.complete()
    upload.abort()
    with pytest.raises(RuntimeError):
        upload.write(b"more")


def test_staged_upload_as_context_manager_aborts_unless_completed(store: BlobStore) -> None:
    with pytest.raises(KeyError), store.stage() as failed:
        failed.write(b"abc")
        raise KeyError("the caller failed")
    with store.stage() as unfinished:
        unfinished.write(b"abc")
    with store.stage() as finished:
        finished.write(b"kept")
        finished.complete()
    assert keys(store, "incoming/") == [finished.staging_key]


# ---- promote -------------------------------------------------------------------------------------


def test_promote_onto_existing_final_key_keeps_it_and_removes_staging(store: BlobStore) -> None:
    put(store, "packets/p.m2kt", b"first")
    second = store.stage()
    second.write(b"second")
    second.complete()
    store.promote(second.staging_key, "packets/p.m2kt")
    assert read_all(store, "packets/p.m2kt") == b"first"
    assert keys(store) == ["packets/p.m2kt"]


def test_promote_of_missing_staging_key_raises_blob_not_found(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        store.promote("incoming/" + "0" * 32, "packets/x.m2kt")
    assert not store.exists("packets/x.m2kt")
    assert keys(store) == []


def test_repeating_a_promote_that_succeeded_is_harmless(store: BlobStore) -> None:
    upload = store.stage()
    upload.write(b"data")
    upload.complete()
    store.promote(upload.staging_key, "packets/x.m2kt")
    store.promote(upload.staging_key, "packets/x.m2kt")
    assert keys(store) == ["packets/x.m2kt"]
    assert read_all(store, "packets/x.m2kt") == b"data"


# ---- staging onto the final key -------------------------------------------------------------------


def test_stage_with_final_key_is_invisible_until_complete_and_promote(store: BlobStore) -> None:
    data = payload(2 * PART + 12345)
    upload = store.stage("packets/final.m2kt")
    assert upload.final_key == "packets/final.m2kt"
    for piece in uneven_chunks(data):
        upload.write(piece)
    assert not store.exists("packets/final.m2kt")
    assert keys(store, "packets/") == []
    upload.complete()
    if (s3 := s3_of(store)) is not None:
        # Straight onto the final key: complete() made it visible, nothing was copied, promote only checks.
        assert upload.staging_key == "packets/final.m2kt"
        assert store.exists("packets/final.m2kt")
        head = s3.client.head_object(Bucket=s3.bucket, Key=s3.prefix + "packets/final.m2kt")
        assert head["ETag"] == s3_multipart_etag(data, PART)
    else:
        assert upload.staging_key.startswith("incoming/")
        assert not store.exists("packets/final.m2kt")
    store.promote(upload.staging_key, "packets/final.m2kt")
    assert read_all(store, "packets/final.m2kt") == data
    assert keys(store) == ["packets/final.m2kt"]
    upload.abort()  # after complete: never removes the blob under its final key
    assert keys(store) == ["packets/final.m2kt"]
    assert_nothing_pending(store)


@pytest.mark.parametrize("size", [pytest.param(1000, id="below-one-part"), pytest.param(3 * PART + 7, id="multipart")])
def test_abort_of_final_key_upload_before_complete_leaves_nothing(store: BlobStore, size: int) -> None:
    upload = store.stage("packets/refused.m2kt")
    upload.write(payload(size))
    upload.abort()
    upload.abort()
    assert_nothing_stored(store)


def test_final_key_upload_over_an_existing_blob_of_the_same_content(store: BlobStore) -> None:
    """Content-addressed keys: a second upload of the same bytes ends with the one blob, intact."""
    data = payload(PART + 99)
    put(store, "packets/same.m2kt", data)
    again = store.stage("packets/same.m2kt")
    again.write(data)
    again.complete()
    store.promote(again.staging_key, "packets/same.m2kt")
    assert keys(store) == ["packets/same.m2kt"]
    assert read_all(store, "packets/same.m2kt") == data
    assert_nothing_pending(store)


def test_promote_of_a_final_key_upload_that_is_missing_raises_blob_not_found(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        store.promote("packets/never.m2kt", "packets/never.m2kt")


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", ""])
def test_stage_refuses_an_unsafe_final_key(store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.stage(key)


# ---- S3 parts in flight --------------------------------------------------------------------------


class RecordingClient:
    """Wraps a boto3 client: counts upload_part calls running at once (each made to take a while),
    and can fail one part number."""

    def __init__(self, client, *, delay: float = 0.05, fail_part: int | None = None) -> None:  # type: ignore[no-untyped-def]
        self._client = client
        self._delay = delay
        self._fail_part = fail_part
        self._lock = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.part_numbers: list[int] = []

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._client, name)

    def upload_part(self, **kwargs):  # type: ignore[no-untyped-def]
        from botocore.exceptions import ClientError

        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.part_numbers.append(kwargs["PartNumber"])
        try:
            time.sleep(self._delay)
            if kwargs["PartNumber"] == self._fail_part:
                raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, "UploadPart")
            return self._client.upload_part(**kwargs)
        finally:
            with self._lock:
                self.running -= 1


@pytest.mark.parametrize("in_flight", [1, 2, PARTS_IN_FLIGHT])
def test_s3_parts_upload_concurrently_and_assemble_in_order(
    s3_server: S3Server, s3_bucket: str, in_flight: int
) -> None:
    client = RecordingClient(s3_server.client())
    store = S3Store(client, s3_bucket, prefix="m2kt/", part_size=PART, parts_in_flight=in_flight)
    data = payload(7 * PART + 4321, seed=3)
    upload = store.stage("packets/many.m2kt")
    for piece in uneven_chunks(data):
        upload.write(piece)
    upload.complete()
    store.promote(upload.staging_key, "packets/many.m2kt")
    assert client.most_running == in_flight  # write() went on while parts were sending, never more at once
    assert sorted(client.part_numbers) == list(range(1, 9))
    head = store.client.head_object(Bucket=s3_bucket, Key="m2kt/packets/many.m2kt")
    assert head["ETag"] == s3_multipart_etag(data, PART)  # 8 parts, in order, exactly part_size long
    assert read_all(store, "packets/many.m2kt") == data
    assert_nothing_pending(store)


@pytest.mark.parametrize("final", [pytest.param(False, id="staging-key"), pytest.param(True, id="final-key")])
def test_s3_failed_part_is_a_storage_error_and_abort_cleans_up(
    s3_server: S3Server, s3_bucket: str, final: bool
) -> None:
    client = RecordingClient(s3_server.client(), delay=0.01, fail_part=2)
    store = S3Store(client, s3_bucket, part_size=PART, parts_in_flight=3)
    upload = store.stage("packets/broken.m2kt" if final else None)
    with pytest.raises(StorageError, match="upload_part 2") as info:
        for piece in uneven_chunks(payload(6 * PART)):
            upload.write(piece)
        upload.complete()
    assert not isinstance(info.value, BlobNotFound)
    with pytest.raises(RuntimeError):
        upload.complete()  # after a failure only abort() is allowed
    upload.abort()
    assert_nothing_stored(store)


# ---- delete / list -------------------------------------------------------------------------------


def test_delete_is_idempotent(store: BlobStore) -> None:
    put(store, "packets/a.m2kt", b"a")
    store.delete("packets/a.m2kt")
    store.delete("packets/a.m2kt")
    store.delete("never/existed")
    assert not store.exists("packets/a.m2kt")
    assert keys(store) == []


def test_list_returns_keys_under_prefix_in_order_with_sizes(store: BlobStore) -> None:
    blobs = {"packets/b.m2kt": b"bb", "packets/a.m2kt": b"a", "packets/a/deeper": b"ddd", "packetsX": b"", "z": b"zz"}
    for key, data in blobs.items():
        put(store, key, data)

    everything = list(store.list())
    assert [(i.key, i.size) for i in everything] == sorted((k, len(v)) for k, v in blobs.items())
    assert all(i.modified.tzinfo is not None and i.modified.utcoffset() == UTC.utcoffset(None) for i in everything)
    assert keys(store, "packets/") == ["packets/a.m2kt", "packets/a/deeper", "packets/b.m2kt"]
    assert keys(store, "packets") == ["packets/a.m2kt", "packets/a/deeper", "packets/b.m2kt", "packetsX"]
    assert keys(store, "packets/a") == ["packets/a.m2kt", "packets/a/deeper"]
    assert keys(store, "packets/a/") == ["packets/a/deeper"]
    assert keys(store, "nothing/here") == []


# ---- keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "a/..", "/etc/passwd", "a//b", "./a", ""])
def test_unsafe_keys_are_rejected(store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.exists(key)
    with pytest.raises(ValueError):
        store.read(key)
    with pytest.raises(ValueError):
        store.delete(key)
    upload = store.stage()
    upload.write(b"x")
    upload.complete()
    with pytest.raises(ValueError):
        store.promote(upload.staging_key, key)
    upload.abort()


def test_local_store_keeps_files_inside_its_root(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "blobs")
    put(local, "packets/ab/cd.m2kt", b"x")
    assert (tmp_path / "blobs" / "packets" / "ab" / "cd.m2kt").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs"]
    assert [p.name for p in (tmp_path / "blobs" / "incoming").iterdir()] == []


# ---- presigned URLs ------------------------------------------------------------------------------


def test_presigned_get_serves_the_object_directly(store: BlobStore) -> None:
    put(store, "packets/p.m2kt", DATA)
    url = store.presigned_get("packets/p.m2kt", 60)
    if isinstance(store, LocalStore | TieredStore):  # a file, or a small blob kept in the database
        assert url is None
        return
    assert url is not None
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == DATA
    ranged = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.content == DATA[10:20]


# ---- readiness, description ----------------------------------------------------------------------


def test_check_passes_on_a_usable_store(store: BlobStore) -> None:
    store.check()


def test_description_names_where_blobs_live(store: BlobStore, tmp_path: Path) -> None:
    if isinstance(store, LocalStore):
        assert store.description == (tmp_path / "blobs").as_uri()
    elif isinstance(store, TieredStore):
        assert store.description.endswith(f"and packets of at most {SMALL} bytes in the database")
        assert store.description.startswith(store.large.description)
    else:
        assert isinstance(store, S3Store)
        assert store.description == f"s3://{store.bucket}/m2kt at {store.client.meta.endpoint_url}"


def test_s3_check_of_missing_bucket_raises_storage_error(s3_server: S3Server) -> None:
    missing = S3Store(s3_server.client(), "m2kt-no-such-bucket")
    with pytest.raises(StorageError, match="does not exist") as info:
        missing.check()
    assert not isinstance(info.value, BlobNotFound)


def test_s3_part_size_below_s3_minimum_is_rejected() -> None:
    with pytest.raises(ValueError, match="part_size"):
        S3Store(object(), "bucket", part_size=(5 << 20) - 1)


# ---- storage_from_url ----------------------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "dummy")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "dummy")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return monkeypatch


@pytest.mark.parametrize(
    ("url", "env", "endpoint", "bucket", "prefix"),
    [
        pytest.param("s3://bucket", {}, None, "bucket", "", id="bucket"),
        pytest.param("s3://bucket/", {}, None, "bucket", "", id="bucket-slash"),
        pytest.param("s3://bucket/pre/fix", {}, None, "bucket", "pre/fix/", id="bucket-prefix"),
        pytest.param("s3://bucket/pre/fix/", {}, None, "bucket", "pre/fix/", id="bucket-prefix-slash"),
        pytest.param(
            "s3://b", {"AWS_ENDPOINT_URL": "http://generic:1"}, "http://generic:1", "b", "", id="env-generic-endpoint"
        ),
        pytest.param(
            "s3://b",
            {"AWS_ENDPOINT_URL": "http://generic:1", "AWS_ENDPOINT_URL_S3": "http://s3only:2"},
            "http://s3only:2",
            "b",
            "",
            id="env-s3-endpoint-wins",
        ),
    ],
)
def test_storage_from_url_builds_s3_store(
    aws_env: pytest.MonkeyPatch, url: str, env: dict[str, str], endpoint: str | None, bucket: str, prefix: str
) -> None:
    for name, value in env.items():
        aws_env.setenv(name, value)
    s3 = storage_from_url(url, part_size=6 << 20)
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.part_size) == (bucket, prefix, 6 << 20)
    if endpoint is None:
        assert "amazonaws.com" in s3.client.meta.endpoint_url
    else:
        assert s3.client.meta.endpoint_url == endpoint


def test_storage_from_url_endpoint_argument_beats_environment(aws_env: pytest.MonkeyPatch) -> None:
    aws_env.setenv("AWS_ENDPOINT_URL_S3", "http://from-env:1")
    s3 = storage_from_url("s3://bucket/p", endpoint_url="http://127.0.0.1:9000")
    assert s3.description == "s3://bucket/p at http://127.0.0.1:9000"


@pytest.mark.parametrize(
    ("url", "relative"),
    [
        pytest.param("file://{tmp}/blobs", "blobs", id="file-absolute"),
        pytest.param("{tmp}/blobs", "blobs", id="plain-absolute-path"),
        pytest.param("file://rel/dir", "rel/dir", id="file-relative"),
        pytest.param("rel/dir", "rel/dir", id="plain-relative-path"),
        pytest.param("file://{tmp}/with%20space", "with space", id="file-percent-encoded"),
    ],
)
def test_storage_from_url_builds_local_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, relative: str
) -> None:
    monkeypatch.chdir(tmp_path)
    local = storage_from_url(url.format(tmp=tmp_path))
    assert isinstance(local, LocalStore)
    assert local.root == tmp_path / relative
    assert (tmp_path / relative / "incoming").is_dir()


@pytest.mark.parametrize("url", ["http://example.com/x", "gs://bucket", "s3://", "s3:///prefix", "file://", "", "  "])
def test_storage_from_url_rejects_other_forms(url: str) -> None:
    with pytest.raises(ValueError, match="s3://bucket"):
        storage_from_url(url)


# ---- S3 unreachable ------------------------------------------------------------------------------


@pytest.fixture
def unreachable(aws_env: pytest.MonkeyPatch) -> S3Store:
    client = make_s3_client(f"http://127.0.0.1:{free_port()}", max_attempts=1, connect_timeout=1, read_timeout=1)
    return S3Store(client, "bucket", "m2kt/", part_size=PART)


def _stage_small(s3: S3Store) -> None:
    upload = s3.stage()
    upload.write(b"abc")
    upload.complete()


def _stage_multipart(s3: S3Store) -> None:
    s3.stage().write(bytes(PART))


@pytest.mark.parametrize(
    "operation",
    [
        pytest.param(lambda s3: s3.check(), id="check"),
        pytest.param(_stage_small, id="stage-write-complete"),
        pytest.param(_stage_multipart, id="stage-write-first-part"),
        pytest.param(lambda s3: s3.read("packets/k"), id="read"),
        pytest.param(lambda s3: s3.read("packets/k", 5, 10), id="read-range"),
        pytest.param(lambda s3: s3.exists("packets/k"), id="exists"),
        pytest.param(lambda s3: s3.size("packets/k"), id="size"),
        pytest.param(lambda s3: s3.delete("packets/k"), id="delete"),
        pytest.param(lambda s3: list(s3.list("packets/")), id="list"),
        pytest.param(lambda s3: s3.promote("incoming/x", "packets/k"), id="promote"),
    ],
)
def test_unreachable_s3_raises_storage_error(unreachable: S3Store, operation) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StorageError) as info:
        operation(unreachable)
    assert not isinstance(info.value, BlobNotFound)
    assert "127.0.0.1" in str(info.value) or "bucket" in str(info.value)


def test_unreachable_s3_abort_raises_storage_error_and_can_be_retried(unreachable: S3Store) -> None:
    upload = unreachable.stage()
    upload.write(b"abc")
    with pytest.raises(StorageError):
        upload.complete()
    with pytest.raises(StorageError):
        upload.abort()  # the staging object may exist: abort must say it could not delete it


# ---- memory --------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_flight", [1, PARTS_IN_FLIGHT])
@pytest.mark.parametrize("final", [pytest.param(False, id="staging-key"), pytest.param(True, id="final-key")])
def test_s3_staging_memory_stays_within_parts_in_flight_plus_one(
    s3_server: S3Server, s3_bucket: str, in_flight: int, final: bool
) -> None:
    """Parts sending at once, plus the one filling: (in_flight + 1) × part_size, whatever the object's size."""
    s3 = S3Store(s3_server.client(), s3_bucket, part_size=PART, parts_in_flight=in_flight)
    chunk = payload(64 << 10)
    total = 64 << 20
    s3.check()  # warm the client (credentials, endpoint resolution) outside the measurement
    tracemalloc.start()
    try:
        upload = s3.stage("packets/mem.m2kt" if final else None)
        for _ in range(total // len(chunk)):
            upload.write(chunk)
        upload.complete()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (in_flight + 1) * PART + (2 << 20), f"peak {peak / 2**20:.1f} MiB"
    assert s3.size(upload.staging_key) == total
    s3.delete(upload.staging_key)
    upload.abort()
    assert keys(s3) == []
    assert_nothing_pending(s3)


def test_presigned_urls_can_name_a_public_endpoint(s3_server, s3_bucket: str) -> None:
    """Behind a proxy or in compose, clients reach S3 at another host than the broker does."""
    public = make_s3_client("http://storage.example.test:9000")
    store = S3Store(s3_server.client(), s3_bucket, presign_client=public)
    url = store.presigned_get("packets/x.m2kt", 60)
    assert url is not None and url.startswith("http://storage.example.test:9000/")


# ---- how the broker's S3 client sends bodies ---------------------------------------------------------------------


def _sent_bodies(client: Any) -> list[dict[str, str]]:
    """The headers of every PutObject / UploadPart the client sends from now on."""
    sent: list[dict[str, str]] = []

    def keep(request: Any, **_: Any) -> None:
        sent.append(
            {
                name.lower(): value.decode() if isinstance(value, bytes) else value
                for name, value in request.headers.items()
            }
        )

    client.meta.events.register("before-send.s3.PutObject", keep)
    client.meta.events.register("before-send.s3.UploadPart", keep)
    return sent


def _broker_client(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # a session created before keeps the credentials it read
    return make_s3_client(s3_server.endpoint, s3_server.region)


def _round_trip(client: Any, bucket: str) -> None:
    store = S3Store(client, bucket, part_size=PART)
    small, large = payload(2_000, seed=1), payload(2 * PART + 17, seed=2)
    put(store, "packets/small.m2kt", small)
    put(store, "packets/large.m2kt", large)
    assert read_all(store, "packets/small.m2kt") == small
    assert read_all(store, "packets/large.m2kt") == large


def test_broker_s3_client_checks_bodies_by_crc32_instead_of_hashing_them_for_the_signature(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over http botocore would SHA-256 every body for the signature: a second hash of each packet, the
    largest part of the broker's CPU in a large upload. With checksums on (botocore's default) each body
    carries a CRC32 that S3 checks instead, and its payload is sent unsigned, as botocore does over https."""
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    client = _broker_client(s3_server, monkeypatch)
    sent = _sent_bodies(client)
    _round_trip(client, s3_bucket)
    assert len(sent) == 4  # one PutObject, three UploadParts
    assert {h["x-amz-content-sha256"] for h in sent} == {"UNSIGNED-PAYLOAD"}
    assert all(h.get("x-amz-checksum-crc32") for h in sent)


def test_broker_s3_client_signs_bodies_when_checksums_are_turned_off(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` no CRC32 goes with a body, so its hash in the
    signature stays the only check of it on the way."""
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    client = _broker_client(s3_server, monkeypatch)
    sent = _sent_bodies(client)
    _round_trip(client, s3_bucket)
    assert len(sent) == 4
    assert all(re.fullmatch(r"[0-9a-f]{64}", h["x-amz-content-sha256"]) for h in sent)
    assert not any("x-amz-checksum-crc32" in h for h in sent)


# ---- the tiered store: small blobs in the database, the rest in S3 ------------------------------------------------


@pytest.fixture
def tiered(database_blobs: DatabaseStore, s3_server: S3Server, s3_bucket: str) -> TieredStore:
    return TieredStore(database_blobs, S3Store(s3_server.client(), s3_bucket, part_size=PART))


def test_tiered_keeps_blobs_up_to_the_limit_in_the_database_and_larger_ones_in_s3(tiered: TieredStore) -> None:
    at_limit, over = payload(SMALL, seed=1), payload(SMALL + 1, seed=2)
    for key, data in (("packets/at.m2kt", at_limit), ("packets/over.m2kt", over)):
        upload = tiered.stage(key)
        for piece in uneven_chunks(data):  # crosses the limit mid-chunk for the larger one
            upload.write(piece)
        upload.complete()
    assert [b.key for b in tiered.small.list()] == ["packets/at.m2kt"]
    assert [b.key for b in tiered.large.list()] == ["packets/over.m2kt"]
    assert read_all(tiered, "packets/at.m2kt") == at_limit and read_all(tiered, "packets/over.m2kt") == over
    assert tiered.size("packets/at.m2kt") == SMALL and tiered.size("packets/over.m2kt") == SMALL + 1
    assert tiered.presigned_get("packets/at.m2kt", 60) is None  # served through the broker
    assert tiered.presigned_get("packets/over.m2kt", 60) is not None


def test_tiered_lists_both_tiers_as_one_in_key_order(tiered: TieredStore) -> None:
    for key, size in (("packets/b", 10), ("packets/a", SMALL + 10), ("packets/d", SMALL + 10), ("packets/c", 10)):
        put(tiered, key, payload(size))
    assert [(b.key, b.size) for b in tiered.list("packets/")] == [
        ("packets/a", SMALL + 10),
        ("packets/b", 10),
        ("packets/c", 10),
        ("packets/d", SMALL + 10),
    ]
    tiered.delete("packets/b")
    tiered.delete("packets/d")
    assert keys(tiered) == ["packets/a", "packets/c"]


def test_database_store_refuses_a_blob_over_its_limit(database_blobs: DatabaseStore) -> None:
    upload = database_blobs.stage("packets/big.m2kt")
    upload.write(payload(SMALL))
    with pytest.raises(StorageError, match="over the database store"):
        upload.write(b"x")
    upload.abort()
    assert keys(database_blobs) == []


def test_turning_inline_blobs_off_keeps_those_stored_readable(
    database_blobs: DatabaseStore, s3_server: S3Server, s3_bucket: str
) -> None:
    """With the setting back at 0 new packets all go to S3, and those stored in the database stay served."""
    s3 = S3Store(s3_server.client(), s3_bucket, part_size=PART)
    engine = database_blobs.engine
    assert with_inline_blobs(s3, engine, 0) is s3 and not inline_blobs_stored(engine)
    put(with_inline_blobs(s3, engine, SMALL), "packets/old.m2kt", b"stored inline")
    assert inline_blobs_stored(engine)

    after = with_inline_blobs(s3, engine, 0, stored_before=True)
    put(after, "packets/new.m2kt", b"stored in s3")
    assert [b.key for b in s3.list()] == ["packets/new.m2kt"]
    assert read_all(after, "packets/old.m2kt") == b"stored inline"
    assert keys(after) == ["packets/new.m2kt", "packets/old.m2kt"]
