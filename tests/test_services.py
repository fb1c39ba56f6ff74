"""The real services CI provides: PostgreSQL and an S3-protocol server behave as the broker needs."""

from __future__ import annotations

import hashlib
import uuid

import httpx
import pytest

from m2kt.benchmarks.harness.services import libpq_url


def test_postgres_transaction_and_jsonb(postgres_url: str) -> None:
    import psycopg

    table = f"m2kt_smoke_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq_url(postgres_url)) as conn:
        conn.execute(f"create temporary table {table} (id text primary key, manifest jsonb not null)")
        conn.execute(f"insert into {table} values (%s, %s::jsonb)", ("a", '{"topic": "t"}'))
        assert conn.execute(f"select manifest->>'topic' from {table}").fetchone() == ("t",)
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"insert into {table} values ('a', '{{}}')")


def test_sqlalchemy_reaches_postgres(postgres_url: str) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("select 1")).scalar() == 1
    engine.dispose()


def test_s3_put_get_presign_and_multipart(s3_server, s3_bucket: str) -> None:
    s3 = s3_server.client()
    body = b"m2kt" * 1000
    s3.put_object(Bucket=s3_bucket, Key="blobs/a", Body=body)
    assert s3.get_object(Bucket=s3_bucket, Key="blobs/a")["Body"].read() == body
    url = s3.generate_presigned_url("get_object", Params={"Bucket": s3_bucket, "Key": "blobs/a"}, ExpiresIn=60)
    response = httpx.get(url, headers={"Range": "bytes=0-3"})
    assert response.status_code == 206 and response.content == b"m2kt"

    part = bytes(5 << 20)
    upload = s3.create_multipart_upload(Bucket=s3_bucket, Key="blobs/big")
    etags = [
        s3.upload_part(Bucket=s3_bucket, Key="blobs/big", UploadId=upload["UploadId"], PartNumber=i, Body=part)["ETag"]
        for i in (1, 2)
    ]
    s3.complete_multipart_upload(
        Bucket=s3_bucket,
        Key="blobs/big",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": e, "PartNumber": i + 1} for i, e in enumerate(etags)]},
    )
    got = s3.get_object(Bucket=s3_bucket, Key="blobs/big")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(part * 2).digest()


def test_broker_skeleton_answers_health() -> None:
    import asyncio

    from m2kt.broker.app import create_app

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app()), base_url="http://broker") as c:
            return await c.get("/healthz")

    assert asyncio.run(get()).json() == {"status": "ok"}
