"""The broker's one settings object, read from ``M2KT_*`` variables (or passed in, in tests).

With nothing configured the broker runs the **embedded default**: SQLite and a local blob
directory under ``./m2kt-data``. Production sets ``M2KT_DATABASE_URL=postgresql+psycopg://…``
and ``M2KT_STORAGE_URL=s3://bucket[/prefix]`` (endpoint and credentials from the standard
``AWS_*`` variables, e.g. ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path("m2kt-data")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="M2KT_", extra="ignore", env_ignore_empty=True)

    data_dir: Path = Field(default=DEFAULT_DATA_DIR, description="Where the embedded default keeps its files.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite in data_dir.")
    storage_url: str | None = Field(
        default=None, description="s3://bucket[/prefix] or a directory; default: data_dir/blobs."
    )
    s3_endpoint_url: str | None = Field(default=None, description="Overrides AWS_ENDPOINT_URL for storage.")
    s3_public_endpoint_url: str | None = Field(
        default=None,
        description="The S3 endpoint clients reach, for ?redirect=1 presigned URLs (default: the broker's).",
    )

    # Limits
    max_packet_bytes: int = Field(default=4 << 30, gt=0)
    max_header_bytes: int = Field(default=4 << 20, gt=0)
    max_concepts_bytes: int = Field(default=64 << 20, gt=0, description="Concept tensor kept in memory for checks.")
    upload_part_bytes: int = Field(default=8 << 20, ge=5 << 20)
    inline_blob_max_bytes: int = Field(
        default=0,
        ge=0,
        le=16 << 20,
        description="Packets of at most this many bytes are stored in the database instead of the blob store "
        "(one INSERT instead of an S3 round trip; served through the broker, never by a presigned URL); "
        "0: every packet in the blob store.",
    )
    max_json_body_bytes: int = Field(
        default=1 << 20, gt=0, description="Request body limit of every route but the packet upload."
    )
    max_tensor_count: int = Field(default=256, gt=0, le=100_000, description="Tensors one packet may hold.")
    max_manifest_bytes: int = Field(
        default=1 << 20, gt=0, description="Size of the signed manifest (the header's JSON metadata)."
    )

    # Quotas (per node; 0 turns a quota off)
    upload_rate_per_minute: float = Field(
        default=120.0, ge=0, description="Sustained uploads per node per minute (token bucket); 0: unlimited."
    )
    upload_burst: int = Field(default=30, ge=1, description="Uploads a node may send at once before the rate applies.")
    node_quota_bytes: int = Field(
        default=0, ge=0, description="Bytes of stored packets a node may publish in all; 0: unlimited."
    )

    # Garbage collection of blobs no committed row points to
    gc_grace_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="A blob without a row, or a staged upload, is removed only once it is this old: "
        "keep it above the longest upload you expect (an S3 multipart upload counts from its start).",
    )
    gc_interval_seconds: float = Field(
        default=0.0, ge=0, description="Run garbage collection in the broker this often; 0: only `m2kt broker gc`."
    )

    # What one node may create (a student or a stolen token cannot fill the registry or a receipt list)
    key_proof_max_age_seconds: float = Field(
        default=86400.0, gt=0, description="How old a key registration's proof of possession may be."
    )
    max_keys_per_node: int = Field(default=32, ge=1, description="Unrevoked keys one node may hold registered.")
    max_topics_per_node: int = Field(
        default=256, ge=1, description="Topics one node may create (by upload or subscription)."
    )
    max_subscriptions_per_node: int = Field(default=256, ge=1, description="Named subscriptions one node may keep.")
    max_receipts_per_packet: int = Field(default=16, ge=1, description="Receipts one node may post for one packet.")
    max_receipt_bytes: int = Field(
        default=64 << 10, ge=1024, description="Size of one receipt's scores and report (JSON)."
    )

    # Safety policy
    safety_threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="Default max declared safety score.")
    flagged_similarity: float = Field(default=0.8, ge=-1.0, le=1.0, description="Cosine at which a concept is flagged.")
    safety_action: Literal["reject", "quarantine"] = "reject"

    # Serving
    presign_ttl_seconds: int = Field(
        default=60,
        gt=0,
        le=7 * 24 * 3600,
        description="Lifetime of ?redirect=1 URLs: they keep working this long after a revocation or quarantine "
        "(S3 checks the signature when a download starts, so a long download still finishes).",
    )
    max_wait_seconds: float = Field(default=30.0, gt=0, le=300)
    poll_fallback_seconds: float = Field(
        default=5.0, gt=0, description="Re-check the database this often while waiting."
    )
    sse_heartbeat_seconds: float = Field(default=15.0, gt=0)

    # Connections and logging: what one connection, or one node, may hold open (per broker process).
    # Token secrets are always redacted from the logs (m2kt.broker.logredact); a token in a query
    # string is refused (400 token_in_query).
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Broker processes sharing the port (m2kt broker serve --workers). More than 1 needs PostgreSQL; "
        "connection caps, upload/stream slots and the per-node upload rate are per process.",
    )
    upload_threads: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="Worker threads uploads use at once for their checks, storage and commit (per process). "
        "Reads, authentication and acknowledgements use the other worker threads, so they never queue "
        "behind a burst of uploads.",
    )
    max_connections: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Open client connections at most. At the cap a new connection closes the oldest one "
        "still waiting for a request; when every one is busy, it gets 503 too_many_connections. "
        "0: half the open-file limit (ulimit -n), between 16 and 1024; a cap the limit cannot hold is lowered.",
    )
    header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="A connection that has not sent a complete request head (request line and headers) this "
        "long after it opened, or after its previous response, is closed.",
    )
    keepalive_timeout_seconds: float = Field(
        default=5.0, gt=0, le=300, description="A keep-alive connection that sends nothing this long is closed."
    )
    body_idle_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="A packet upload from which no byte arrives this long is refused (408 upload_stalled; its "
        "staged data is discarded); any other request body must be complete this long after the request head "
        "(408 body_stalled); a response the client reads none of for this long is dropped, its connection closed.",
    )
    max_uploads_per_node: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="Packet uploads one node may have in progress at once; 429 too_many_uploads.",
    )
    max_streams_per_node: int = Field(
        default=8,
        ge=1,
        le=1000,
        description="Event streams (SSE, and long-polls with ?wait=) one node may hold open at once; "
        "429 too_many_streams.",
    )

    # Bootstrap: an admin token to create on first start (production); the embedded default
    # generates one and writes it to data_dir/admin-token when no admin exists yet.
    bootstrap_admin_token: str | None = Field(default=None, min_length=20)
    token_ttl_days: int = Field(default=365, gt=0)

    @field_validator("database_url")
    @classmethod
    def _normalise_postgres(cls, url: str | None) -> str | None:
        if url and url.startswith(("postgres://", "postgresql://")):
            return "postgresql+psycopg://" + url.split("://", 1)[1]
        return url

    @model_validator(mode="after")
    def _no_placeholder_token(self) -> Settings:
        if self.bootstrap_admin_token and self.bootstrap_admin_token.lower().startswith(("changeme", "change-me")):
            raise ValueError("M2KT_BOOTSTRAP_ADMIN_TOKEN is a placeholder; set a real secret")
        return self

    @property
    def embedded(self) -> bool:
        """True when running on the embedded default database."""
        return self.database_url is None

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'm2kt.db').resolve()}"

    @property
    def effective_storage_url(self) -> str:
        return self.storage_url or str((self.data_dir / "blobs").resolve())

    @property
    def is_postgres(self) -> bool:
        return self.effective_database_url.startswith("postgresql")
