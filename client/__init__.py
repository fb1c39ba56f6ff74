"""M2KT: Model-to-Model Knowledge Transmission — signed knowledge packets, a broker, teacher and student nodes.

    import m2kt
    with m2kt.BrokerClient("http://127.0.0.1:8000", token="m2kt_…") as broker:
        record = broker.publish("k.m2kt", topic="arith.mod97")

The package is layered; each layer imports only those below it (``tests/test_layers.py`` keeps it so)::

    m2kt.errors       the one error tree (M2KTError …)
    m2kt.format       the packet format: packet, manifest, keys, probe-text codec (numpy, no torch, no HTTP)
    m2kt.sdk          BrokerClient / AsyncBrokerClient over httpx, retries, records
    m2kt.nn           the torch layer: model adapters, batches, captures, device, digests
    m2kt.teacher      Algorithm 1: a model and a spec in, a signed packet out
    m2kt.student      Algorithm 2: CAL, composite loss, verifier, rollback, IngestReport
    m2kt.toy          symbolic tasks and the TinyTransformer (brings its own adapter)
    m2kt.demo         the whole loop on one machine
    m2kt.benchmarks   experiments and performance runs, and the harness they share with the tests
    m2kt.cli          the ``m2kt`` command
    m2kt.broker       the service (FastAPI); it imports m2kt.errors and m2kt.format only
    m2kt.migrations   Alembic, the only way the broker's schema changes

Importing ``m2kt`` loads nothing else: the names below are resolved on first use, so ``import m2kt`` is
cheap and never imports torch or the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        (
            "AuthError",
            "BrokerError",
            "Conflict",
            "M2KTError",
            "MalformedRequest",
            "NotFound",
            "PacketError",
            "PacketFormatError",
            "PermissionDenied",
            "RateLimited",
            "ServiceUnavailable",
            "TooLarge",
            "TransportError",
            "ValidationError",
            "VerificationError",
        ),
        "m2kt.errors",
    ),
    **dict.fromkeys(
        (
            "Delivery",
            "Event",
            "EventPage",
            "FetchedPacket",
            "KeyRecord",
            "Lineage",
            "PacketRecord",
            "Receipt",
            "SubscriptionRecord",
            "TopicRecord",
        ),
        "m2kt.sdk.records",
    ),
    "RetryPolicy": "m2kt.sdk.retry",
    "BrokerClient": "m2kt.sdk.client",
    "AsyncBrokerClient": "m2kt.sdk.async_client",
    **dict.fromkeys(
        ("SigningKey", "VerifyKey", "generate_keypair", "load_signing_key", "load_verify_key"), "m2kt.format.keys"
    ),
    "Manifest": "m2kt.format.manifest",
    "ManifestBody": "m2kt.format.manifest",
    "Packet": "m2kt.format.reader",
    "open_packet": "m2kt.format.reader",
    "verify_packet": "m2kt.format.verifier",
    "write_packet": "m2kt.format.writer",
}

__all__ = [
    "AsyncBrokerClient",
    "AuthError",
    "BrokerClient",
    "BrokerError",
    "Conflict",
    "Delivery",
    "Event",
    "EventPage",
    "FetchedPacket",
    "KeyRecord",
    "Lineage",
    "M2KTError",
    "MalformedRequest",
    "Manifest",
    "ManifestBody",
    "NotFound",
    "Packet",
    "PacketError",
    "PacketFormatError",
    "PacketRecord",
    "PermissionDenied",
    "RateLimited",
    "Receipt",
    "RetryPolicy",
    "ServiceUnavailable",
    "SigningKey",
    "SubscriptionRecord",
    "TooLarge",
    "TopicRecord",
    "TransportError",
    "ValidationError",
    "VerificationError",
    "VerifyKey",
    "__version__",
    "generate_keypair",
    "load_signing_key",
    "load_verify_key",
    "open_packet",
    "verify_packet",
    "write_packet",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'm2kt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what type checkers and IDEs see; nothing is imported at run time
    from m2kt.errors import (
        AuthError,
        BrokerError,
        Conflict,
        M2KTError,
        MalformedRequest,
        NotFound,
        PacketError,
        PacketFormatError,
        PermissionDenied,
        RateLimited,
        ServiceUnavailable,
        TooLarge,
        TransportError,
        ValidationError,
        VerificationError,
    )
    from m2kt.format.keys import SigningKey, VerifyKey, generate_keypair, load_signing_key, load_verify_key
    from m2kt.format.manifest import Manifest, ManifestBody
    from m2kt.format.reader import Packet, open_packet
    from m2kt.format.verifier import verify_packet
    from m2kt.format.writer import write_packet
    from m2kt.sdk.async_client import AsyncBrokerClient
    from m2kt.sdk.client import BrokerClient
    from m2kt.sdk.records import (
        Delivery,
        Event,
        EventPage,
        FetchedPacket,
        KeyRecord,
        Lineage,
        PacketRecord,
        Receipt,
        SubscriptionRecord,
        TopicRecord,
    )
    from m2kt.sdk.retry import RetryPolicy
