"""Blobs as objects in one S3 bucket: a staged upload is a multipart upload on its final key."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC
from typing import Any, NoReturn

from m2kt.broker.storage.base import (
    MIN_PART_SIZE,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    ChunkStream,
    StagedUpload,
    StorageError,
    UnfinishedUpload,
    check_key,
    check_range,
    new_staging_key,
)

__all__ = ["MAX_COPY_OBJECT_SIZE", "MAX_PARTS", "PARTS_IN_FLIGHT", "S3Store", "make_s3_client"]

MAX_PARTS = 10_000  # S3's maximum number of parts in one multipart upload
MAX_COPY_OBJECT_SIZE = 5 << 30  # the largest object a single CopyObject may copy
PARTS_IN_FLIGHT = 3  # S3 parts sending at once per staged upload: memory ≈ (this + 1) × part_size


_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}


def _client_error_details(exc: BaseException | None) -> tuple[str, int, str]:
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    error = response.get("Error", {})
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0), str(error.get("Message", ""))


class S3Store(BlobStore):
    """Blobs as objects in one bucket, under an optional key prefix."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        part_size: int = 8 << 20,
        parts_in_flight: int = PARTS_IN_FLIGHT,
        presign_client: Any = None,
    ) -> None:
        """``presign_client`` signs ``presigned_get`` URLs for the endpoint clients reach (e.g. a public
        host, when the broker talks to storage on an internal one); by default, ``client`` does.
        ``parts_in_flight`` parts of a staged upload are sent at once (1: one after the other)."""
        if not bucket:
            raise ValueError("bucket must not be empty")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum part size)")
        if parts_in_flight < 1:
            raise ValueError("parts_in_flight must be at least 1")
        prefix = prefix.lstrip("/")
        self.client = client
        self.presign_client = presign_client or client
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.part_size = part_size
        self.parts_in_flight = parts_in_flight
        # Mirror s3transfer: with botocore's default checksum policy, multipart uploads declare CRC32.
        config = getattr(getattr(client, "meta", None), "config", None)
        self._checksum = getattr(config, "request_checksum_calculation", None) == "when_supported"

    def _key(self, key: str) -> str:
        check_key(key)
        return self.prefix + key

    def _url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    @contextlib.contextmanager
    def _errors(self, operation: str, key: str, ignore: tuple[str, ...] = ()) -> Iterator[None]:
        """Translate botocore failures into BlobNotFound / StorageError; swallow error codes in ``ignore``."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            if _client_error_details(exc)[0] not in ignore:
                self._raise_client_error(exc, operation, key)
        except BotoCoreError as exc:
            raise StorageError(f"S3 {operation} of {self._url(key)} failed: {exc}") from exc

    def _raise_client_error(self, exc: Exception, operation: str, key: str) -> NoReturn:
        code, status, message = _client_error_details(exc)
        if code in _NOT_FOUND_CODES or (status == 404 and code not in ("NoSuchBucket", "NoSuchUpload")):
            raise BlobNotFound(f"S3 {operation}: {self._url(key)} does not exist") from exc
        raise StorageError(f"S3 {operation} of {self._url(key)} failed: {code or status} {message}".rstrip()) from exc

    def stage(self, final_key: str | None = None) -> StagedUpload:
        if final_key is None:
            return _S3StagedUpload(self, new_staging_key(), None)
        return _S3StagedUpload(self, final_key, final_key)

    def promote(self, staging_key: str, final_key: str) -> None:
        from boto3.s3.transfer import TransferConfig

        source, target = self._key(staging_key), self._key(final_key)
        if staging_key == final_key:  # staged onto its final key: complete() already made it visible
            self._head(final_key)
            return
        if not self.exists(final_key):
            # Managed copy: one CopyObject up to 5 GiB, multipart UploadPartCopy above that.
            config = TransferConfig(multipart_threshold=MAX_COPY_OBJECT_SIZE, multipart_chunksize=512 << 20)
            try:
                with self._errors("copy", staging_key):
                    self.client.copy({"Bucket": self.bucket, "Key": source}, self.bucket, target, Config=config)
            except StorageError:
                raise
            except Exception as exc:  # s3transfer fails in its own ways, e.g. KeyError on a bad UploadPartCopy reply
                raise StorageError(f"S3 copy of {self._url(staging_key)} to {final_key!r} failed: {exc!r}") from exc
        self.delete(staging_key)

    def _head(self, key: str) -> dict[str, Any]:
        with self._errors("head", key):
            response: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return response

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except BlobNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def read(self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError

        check_range(start, end)
        if end is not None and end == start:
            self._head(key)  # empty range: only report a missing key
            return iter(())
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if start or end is not None:
            params["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            with self._errors("read", key):
                response = self.client.get_object(**params)
        except StorageError as exc:
            code, status, _ = _client_error_details(exc.__cause__ or exc)
            if "Range" not in params or not (status == 416 or code in ("InvalidRange", "InvalidArgument")):
                raise
            # The range reaches past the end. AWS answers 416 when start >= size and clamps the end; other
            # servers (nanio) answer 400 for any end past the size. Clamp like a slice and ask once more.
            size = self.size(key)
            stop = size if end is None else min(end, size)
            if start >= stop:
                return iter(())
            params["Range"] = f"bytes={start}-{stop - 1}"
            with self._errors("read", key):
                response = self.client.get_object(**params)
        body = response["Body"]

        def read_chunk(n: int) -> bytes:
            try:
                data: bytes = body.read(n)
            except (BotoCoreError, OSError) as exc:
                raise StorageError(f"S3 read of {self._url(key)} failed mid-stream: {exc}") from exc
            return data

        return ChunkStream(read_chunk, body.close, None, chunk_size)

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors("list", prefix + "*"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for obj in page.get("Contents", ()):
                    modified = obj["LastModified"].astimezone(UTC)
                    yield BlobInfo(obj["Key"][len(self.prefix) :], int(obj["Size"]), modified)

    def unfinished_uploads(self) -> Iterator[UnfinishedUpload]:
        """``incoming/`` objects, and multipart uploads under the prefix that were never completed."""
        yield from super().unfinished_uploads()
        paginator = self.client.get_paginator("list_multipart_uploads")
        with self._errors("list_multipart_uploads", "*"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for up in page.get("Uploads", ()):
                    started = up["Initiated"].astimezone(UTC)
                    yield UnfinishedUpload(up["Key"][len(self.prefix) :], started, up["UploadId"])

    def discard_unfinished(self, upload: UnfinishedUpload) -> None:
        if upload.upload_id is None:
            self.delete(upload.key)
            return
        with self._errors("abort_multipart_upload", upload.key, ignore=("NoSuchUpload",)):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(upload.key), UploadId=upload.upload_id)

    def presigned_get(self, key: str, ttl_seconds: int) -> str | None:
        with self._errors("presign", key):
            url: str = self.presign_client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=ttl_seconds
            )
            return url

    def _bucket_exists(self) -> bool:
        """head_bucket: False when the bucket does not exist; any other failure is a StorageError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except ClientError as exc:
            code, status, message = _client_error_details(exc)
            if status == 404 or code in ("NoSuchBucket", "NotFound"):
                return False
            raise StorageError(f"S3 head_bucket {self.bucket!r} failed: {code or status} {message}".rstrip()) from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 head_bucket {self.bucket!r} failed: {exc}") from exc

    def check(self) -> None:
        if not self._bucket_exists():
            raise StorageError(f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}")

    def create(self) -> bool:
        if self._bucket_exists():
            return False
        with self._errors("create_bucket", ""):
            self.client.create_bucket(Bucket=self.bucket)
        return True

    @property
    def endpoint(self) -> str:
        return str(getattr(getattr(self.client, "meta", None), "endpoint_url", "") or "the AWS default endpoint")

    @property
    def description(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix.rstrip('/')}" if self.prefix else f"s3://{self.bucket}"
        return f"{where} at {self.endpoint}"


class _S3StagedUpload(StagedUpload):
    """Buffers one part; starts a multipart upload once a full part exists and sends the parts from a
    few helper threads while the caller goes on writing. Smaller uploads are one put_object in complete().
    At most parts_in_flight parts are sending while one more fills; the buffers of sent parts are reused.

    Staged onto a final key, the multipart upload is on that key: invisible until completed, and abort()
    never deletes the object there (it is content-addressed, so it may be another upload's as well).
    """

    def __init__(self, store: S3Store, staging_key: str, final_key: str | None) -> None:
        super().__init__(staging_key, final_key)
        self._store = store
        self._key = store._key(staging_key)
        self._buffer = bytearray()  # grows while it fills, unless it is a reused part buffer
        self._filled = 0  # bytes of _buffer in use
        self._spare: list[bytearray] = []  # buffers of parts that were sent
        self._upload_id: str | None = None
        self._next_part = 1
        self._parts: dict[int, dict[str, Any]] = {}
        self._in_flight: set[Future[tuple[dict[str, Any], bytearray]]] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._multipart_done = False
        self._object_may_exist = False

    def _write(self, view: memoryview) -> None:
        self._collect(block=False)  # report a failed part as soon as it is known
        part_size = self._store.part_size
        while view:
            start = self._filled
            take = min(len(view), part_size - start)
            if start + take <= len(self._buffer):  # a reused buffer: copy in place
                self._buffer[start : start + take] = view[:take]
            else:
                self._buffer += view[:take]
            self._filled = start + take
            view = view[take:]
            if self._filled == part_size:
                self._send_part()

    def _take_buffer(self) -> bytearray:
        """The bytes written so far; a reused (or new) buffer takes their place."""
        body = self._buffer
        del body[self._filled :]  # no-op for a full part
        self._buffer = self._spare.pop() if self._spare else bytearray()
        self._filled = 0
        return body

    def _send_part(self) -> None:
        """Hand the buffer to a helper thread as the next part; waits while parts_in_flight are sending."""
        store, client = self._store, self._store.client
        number = self._next_part
        if number > MAX_PARTS:
            raise StorageError(
                f"S3 upload to {store._url(self.staging_key)} exceeds {MAX_PARTS} parts of {store.part_size} bytes"
            )
        if self._upload_id is None:
            extra = {"ChecksumAlgorithm": "CRC32"} if store._checksum else {}
            with store._errors("create_multipart_upload", self.staging_key):
                created = client.create_multipart_upload(Bucket=store.bucket, Key=self._key, **extra)
            self._upload_id = str(created["UploadId"])
        while len(self._in_flight) >= store.parts_in_flight:
            self._collect(block=True)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(store.parts_in_flight, thread_name_prefix="m2kt-s3-part")
        body = self._take_buffer()
        self._in_flight.add(self._pool.submit(self._upload_part, self._upload_id, number, body))
        self._next_part = number + 1

    def _upload_part(self, upload_id: str, number: int, body: bytearray) -> tuple[dict[str, Any], bytearray]:
        """Runs in a helper thread: only reads what does not change once the multipart upload exists."""
        store = self._store
        extra = {"ChecksumAlgorithm": "CRC32"} if store._checksum else {}
        with store._errors(f"upload_part {number}", self.staging_key):
            response = store.client.upload_part(
                Bucket=store.bucket, Key=self._key, UploadId=upload_id, PartNumber=number, Body=body, **extra
            )
        part = {"ETag": response["ETag"], "PartNumber": number}
        if "ChecksumCRC32" in response:
            part["ChecksumCRC32"] = response["ChecksumCRC32"]
        return part, body  # botocore is done with body: it may be reused

    def _collect(self, *, block: bool) -> None:
        """Record finished parts (with block, wait for at least one); re-raise the first failure."""
        if not self._in_flight:
            return
        if block:
            done, _ = wait(self._in_flight, return_when=FIRST_COMPLETED)
        else:
            done = {future for future in self._in_flight if future.done()}
        for future in done:
            self._in_flight.discard(future)
            part, body = future.result()
            self._parts[part["PartNumber"]] = part
            if len(body) == self._store.part_size and len(self._spare) < self._store.parts_in_flight:
                self._spare.append(body)

    def _drain(self) -> None:
        """Let parts already sending finish (their errors no longer matter) and stop the helper threads."""
        if self._in_flight:
            wait(self._in_flight)
            for future in self._in_flight:
                future.exception()  # retrieved: it was reported, or is moot after an abort
            self._in_flight.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._spare.clear()

    def _complete(self) -> None:
        store, client = self._store, self._store.client
        if self._upload_id is None:
            self._object_may_exist = True
            body = self._take_buffer()
            with store._errors("put_object", self.staging_key):
                client.put_object(Bucket=store.bucket, Key=self._key, Body=body)
            return
        if self._filled:
            self._send_part()
        while self._in_flight:
            self._collect(block=True)
        self._drain()
        self._object_may_exist = True
        parts = [self._parts[n] for n in sorted(self._parts)]
        with store._errors("complete_multipart_upload", self.staging_key):
            client.complete_multipart_upload(
                Bucket=store.bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}
            )
        self._multipart_done = True

    def _abort(self) -> None:
        store, client = self._store, self._store.client
        self._buffer, self._filled = bytearray(), 0
        self._drain()  # a part still sending could outlive the abort and leave storage behind
        if self._upload_id is not None and not self._multipart_done:
            # NoSuchUpload: already gone (completed, or aborted by an earlier attempt that timed out).
            with store._errors("abort_multipart_upload", self.staging_key, ignore=("NoSuchUpload",)):
                client.abort_multipart_upload(Bucket=store.bucket, Key=self._key, UploadId=self._upload_id)
            self._multipart_done = True
        if self._object_may_exist and self.final_key is None:
            store.delete(self.staging_key)
        self._object_may_exist = False

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            with contextlib.suppress(Exception):
                pool.shutdown(wait=False, cancel_futures=True)


def make_s3_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    *,
    connect_timeout: float = 5,
    read_timeout: float = 60,
    max_attempts: int = 5,
) -> Any:
    """boto3 S3 client with timeouts and retries set in botocore Config (retries mode 'standard'), signature v4.

    Credentials come from the standard AWS variables / config chain (boto3 default). With a custom
    endpoint (MinIO, nanio, Ceph, R2, …) path-style addressing is used.
    """
    import boto3
    from botocore.config import Config

    s3: dict[str, Any] = {"addressing_style": "path"} if endpoint_url else {}
    config = Config(
        signature_version="s3v4",
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "max_attempts": max_attempts},
        s3=s3 or None,
    )
    client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
    if client.meta.config.request_checksum_calculation == "when_supported":
        # Every body then carries a CRC32 that S3 checks, and the broker checks each packet's own digest end to
        # end: signing the payload as well (botocore does over http) would hash each body once more, the
        # largest part of the broker's CPU in a large upload. Over https botocore already skips it.
        config = config.merge(Config(s3={**s3, "payload_signing_enabled": False}))
        client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
    return client
