"""M2KT client SDK: the packet format, keys, and the broker client. Teacher extraction and
student ingestion live in ``client.teacher`` / ``client.student`` (which import torch; this
package does not).

Errors all derive from :class:`M2KTError` (the tree is drawn in ``client._exceptions``);
packet-format refusals are :class:`PacketError` with a stable ``code``.
"""

from client._exceptions import (
    AuthError,
    BrokerError,
    Conflict,
    M2KTError,
    MalformedRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
    TooLarge,
    TransportError,
    ValidationError,
    VerificationError,
)
from client._models import (
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
from client._retry import RetryPolicy
from client.api import AsyncBrokerClient, BrokerClient
from client.keys import SigningKey, VerifyKey, generate_keypair, load_signing_key, load_verify_key
from client.manifest import Manifest, ManifestBody
from client.packet import (
    Packet,
    PacketError,
    PacketFormatError,
    PacketVerificationError,
    open_packet,
    verify_packet,
    write_packet,
)

__version__ = "0.1.0"

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
    "PacketVerificationError",
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
