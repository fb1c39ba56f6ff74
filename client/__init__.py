"""M2KT client SDK: the packet format, keys, and (in later modules) the broker client,
teacher extraction and student ingestion.

Importing ``client`` is cheap and never imports torch; the teacher and student subpackages do.
"""

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
    "Manifest",
    "ManifestBody",
    "Packet",
    "PacketError",
    "PacketFormatError",
    "PacketVerificationError",
    "SigningKey",
    "VerifyKey",
    "__version__",
    "generate_keypair",
    "load_signing_key",
    "load_verify_key",
    "open_packet",
    "verify_packet",
    "write_packet",
]
